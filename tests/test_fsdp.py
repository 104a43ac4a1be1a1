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
