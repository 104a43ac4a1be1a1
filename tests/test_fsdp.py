"""FSDP2 through Accelerate (``accelerate launch --use_fsdp --fsdp_version 2``) on real 2-process
gloo groups on the CPU: the same losses, weights and per-sample tables as DDP on the same
processes (which equal one process with the same global batch: ``test_distributed``,
``test_accumulation``; a run on one process reads its samples in another order, as the loader
splits shards among processes); a SIGKILLed FSDP run resumed from its sharded checkpoint equals
an uninterrupted one; a checkpoint written under FSDP resumes under DDP, and one written under
DDP under FSDP.

The run: FastCLIP-v3 (the learned temperature in its own parameter group) with GloFND, cached
accumulation over 2 micro-batches, 4 optimiser steps, a checkpoint every 2.

Tolerances: DDP sums the gradients with one all-reduce, FSDP with a reduce-scatter (each
process sums its shard's slice, in another order), so they differ by float32 rounding, a few
units in the last place a step, which the optimiser carries on; 1e-5 on losses, weights and
tables over 4 steps holds that with room (measured: 3e-6 over 8 steps). A resume under the
same sharding is exact (1e-6, as every resume test).
"""

from __future__ import annotations

import shutil

import pytest
import safetensors.torch
import torch

from runs import assert_same_losses, launch, launch_and_kill, losses, write_config

pytestmark = pytest.mark.slow

EXTRA = {
    "loss.name": "fastclip_v3",
    "fnd.detector": "glofnd",
    "fnd.start_mask": 0,
    "fnd.start_update": 0,
    "optim.accum_steps": 2,
    "train.epochs": 1,
    "train.checkpoint_every": 2,
    "data.val": None,
    "data.num_workers": 0,  # the sharding is under test here, not the loader
}
TOL = 1e-5


@pytest.fixture(scope="module")
def runs(shapes, tmp_path_factory):
    """The same run under FSDP and under DDP, 2 processes each."""
    root = tmp_path_factory.mktemp("fsdp")
    out = {}
    for name, fsdp in (("fsdp", True), ("ddp", False)):
        run = root / name
        launch(write_config(root / f"{name}.yaml", shapes, run, EXTRA), fsdp=fsdp)
        out[name] = run
    out["root"] = root
    return out


def _checkpoint(run, step: int):
    return run / "checkpoints" / f"step_{step:08d}"


def _close(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert sorted(a) == sorted(b)
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a)


def test_fsdp_gives_the_losses_weights_and_tables_of_ddp(runs):
    final = _checkpoint(runs["fsdp"], 4)
    assert (final / "optimizer_fsdp").is_dir()  # the optimiser state, sharded
    assert {p.name for p in (final / "optimizer_fsdp").glob("*.safetensors")} >= {
        "shard-00001-model-00001-of-00001.safetensors",
        "shard-00002-model-00001-of-00001.safetensors",
    }  # each process wrote its own
    got, want = losses(runs["fsdp"]), losses(runs["ddp"])
    assert sorted(got) == sorted(want) == [1, 2, 3, 4]
    assert max(abs(got[s] - want[s]) for s in got) <= TOL, (got, want)
    ref = _checkpoint(runs["ddp"], 4)
    weights = safetensors.torch.load_file(str(final / "model.safetensors"))
    assert weights["logit_scale"].shape == ()  # as under DDP: export and eval read it as is
    assert _close(weights, safetensors.torch.load_file(str(ref / "model.safetensors"))) <= TOL
    tables = safetensors.torch.load_file(str(final / "tables.safetensors"))
    assert _close(tables, safetensors.torch.load_file(str(ref / "tables.safetensors"))) <= TOL


def test_a_killed_fsdp_run_resumes_exactly(runs, shapes):
    root = runs["root"]
    run = root / "killed"
    config = write_config(root / "killed.yaml", shapes, run, EXTRA)
    launch_and_kill(config, run, 3, fsdp=True)  # the checkpoint of step 2 is inside the epoch
    launch(config, "resume=latest", fsdp=True)
    assert_same_losses(run, runs["fsdp"], range(1, 5))


@pytest.mark.parametrize("written,resumed", [("fsdp", "ddp"), ("ddp", "fsdp")])
def test_a_checkpoint_resumes_under_the_other_sharding(runs, shapes, written, resumed):
    root = runs["root"]
    run = root / f"{written}_to_{resumed}"
    (run / "checkpoints").mkdir(parents=True)
    shutil.copytree(_checkpoint(runs[written], 2), _checkpoint(run, 2))
    config = write_config(root / f"{run.name}.yaml", shapes, run, EXTRA)
    launch(config, "resume=latest", fsdp=resumed == "fsdp")
    got, want = losses(run), losses(runs[written])
    assert sorted(got) == [3, 4]
    assert max(abs(got[s] - want[s]) for s in got) <= TOL, (got, want)


def _our_frames(stderr: str) -> list[str]:
    """Traceback frames of clipfnd's code (the launcher prints its own traceback of a failed
    child, ChildFailedError, which is Accelerate's and torch's, not ours)."""
    ours = ("/clipfnd/", "/data_pipelines/", "/eval/")
    return [
        x
        for x in stderr.splitlines()
        if x.strip().startswith("File") and any(o in x for o in ours) and "site-packages" not in x
    ]


def _recompute_checksums(ckpt) -> None:
    """The checksums made to match the changed files (a careful edit)."""
    import json

    from clipfnd.checkpoints import file_checksums

    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["checksums"] = file_checksums(ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


def test_a_missing_optimiser_shard_or_a_malformed_layout_is_skipped_or_refused_in_one_line(
    runs, shapes
):
    """The newest checkpoint lacks one process's DCP optimiser shard, the one before has a
    malformed optimizer_fsdp.json (checksums recomputed in both): resume=latest skips the
    first on both processes together, naming the incomplete optimiser state (it used to fail
    on both with a 199-line size mismatch), and refuses the second, the last candidate, in
    one line per process that names what is wrong."""
    root = runs["root"]
    run = root / "missing_shard"
    shutil.copytree(runs["fsdp"], run)
    (run / "summary.json").unlink()
    newest, before = _checkpoint(run, 4), _checkpoint(run, 2)
    (newest / "optimizer_fsdp" / "shard-00002-model-00001-of-00001.safetensors").unlink()
    _recompute_checksums(newest)
    (before / "optimizer_fsdp.json").write_text('{"param_groups": [], "values": 1}')
    _recompute_checksums(before)
    config = write_config(root / "missing_shard.yaml", shapes, run, EXTRA)
    proc = launch(config, "resume=latest", fsdp=True, expect_ok=False)
    assert proc.returncode != 0
    assert f"checkpoint {newest} cannot be loaded (rank 0: {newest}/optimizer_fsdp: " in proc.stderr
    assert "values in its shard files; one missing or replaced?" in proc.stderr
    assert f"every process falls back to {before}" in proc.stderr
    # one line from each process (they share one pipe: the two may interleave)
    assert f"error: cannot load checkpoint {before}: rank 0: " in proc.stderr
    assert "optimizer_fsdp.json: 'param_groups' is not a list of parameter groups" in proc.stderr
    assert "Size mismatch" not in proc.stderr and not _our_frames(proc.stderr), proc.stderr[-3000:]
