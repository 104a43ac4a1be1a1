"""Processes of one run agree: on the checkpoint they resume from when one process's files are
bad, and on stopping, with one line each, when one process fails (real 2-process gloo runs).

Before, a bad rank-1 RNG or loader file made rank 1 fall back to an older checkpoint while
rank 0 resumed the newer one (wrong losses, then a hang), and a process that failed left the
others to die on a raw gloo "Connection closed by peer" traceback.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
from pathlib import Path

import pytest

from clipfnd.checkpoints import file_checksums, find_latest

from runs import assert_same_losses, file_size_limit, launch, launch_machines, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]

STEPS = {"train.epochs": 3, "train.max_steps": 20, "eval.at_end": False}  # checkpoints 4, ..., 20


@pytest.fixture(scope="module")
def reference(shapes, tmp_path_factory):
    root = tmp_path_factory.mktemp("agree")
    # checkpoints are under test here, not the loader's workers (each would start a fork server)
    cfg = write_config(root / "c.yaml", shapes, root / "run", {**STEPS, "data.num_workers": 0})
    launch(cfg)
    return cfg, root / "run"


class _Payload:
    def __init__(self, mark: Path):
        self.mark = mark

    def __reduce__(self):  # unpickling this calls open(mark, "w")
        return (open, (str(self.mark), "w"))


def _recompute_checksums(ckpt: Path) -> None:
    """What a careful forger does: the checksums made to match the changed files."""
    state = json.loads((ckpt / "trainer_state.json").read_text())
    state["checksums"] = file_checksums(ckpt)
    (ckpt / "trainer_state.json").write_text(json.dumps(state))


def _rng_random_bytes(ckpt: Path, mark: Path) -> None:
    (ckpt / "random_states_1.pkl").write_bytes(os.urandom(14433))
    _recompute_checksums(ckpt)


def _loader_state_bad(ckpt: Path, mark: Path) -> None:
    (ckpt / "loader_rank1.json").write_text('{"epoch": 0, "batches": "x", "consumed": [0]}')
    _recompute_checksums(ckpt)


def _no_checksums_bad_rank1_file(ckpt: Path, mark: Path) -> None:
    state = json.loads((ckpt / "trainer_state.json").read_text())
    del state["checksums"]  # as an older checkpoint
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    (ckpt / "loader_rank1.json").write_text("{ not json")


def _rng_as_pickle(ckpt: Path, mark: Path) -> None:
    (ckpt / "random_states_1.pkl").write_bytes(pickle.dumps(_Payload(mark)))
    _recompute_checksums(ckpt)


CORRUPT = {
    "rng_random_bytes": _rng_random_bytes,
    "loader_state_bad": _loader_state_bad,
    "no_checksums_bad_rank1_file": _no_checksums_bad_rank1_file,
    "rng_as_pickle": _rng_as_pickle,
}


def _spoil_rank1(reference: Path, dst: Path) -> dict[str, Path]:
    """A copy of the reference run whose checkpoints of steps 8 to 20 each have one bad rank-1
    file, spoilt one of the four ways (step 20 the first, step 8 the last); step 4's is sound."""
    shutil.copytree(reference, dst)
    (dst / "summary.json").unlink()
    spoilt = {}
    for step, how in zip((20, 16, 12, 8), CORRUPT):
        ckpt = dst / "checkpoints" / f"step_{step:08d}"
        CORRUPT[how](ckpt, dst.parent / "pwned")
        spoilt[how] = ckpt
    return spoilt


def _no_raw_traceback(stderr: str) -> None:
    """No clipfnd frame and no gloo peer error reached the user (the launcher's own report of
    a failed child is Accelerate's, not ours)."""
    assert "Connection closed by peer" not in stderr
    assert "/clipfnd/" not in stderr.replace("clipfnd/train/", "").replace("/clipfnd/run", ""), (
        stderr[-3000:]
    )


def test_every_rank_falls_back_to_the_same_checkpoint(reference, tmp_path):
    """resume=latest meets four checkpoints, each with a bad rank-1 file: both processes skip
    each of them together (a warning names rank 1 and the file) and resume from step 4, and
    steps 5-20 equal the uninterrupted run's. Rank 1 used to fall back alone."""
    cfg, ref = reference
    run = tmp_path / "run"
    spoilt = _spoil_rank1(ref, run)
    proc = launch(cfg, f"output_dir={run}", "resume=latest")
    for how, ckpt in spoilt.items():
        warning = f"checkpoint {ckpt} cannot be loaded (rank 1: "
        assert proc.stderr.count(warning) == 1, (how, proc.stderr[-4000:])  # said once
    assert "every process falls back to" in proc.stderr
    assert "resumed from" in proc.stderr and "step_00000004 (step 4" in proc.stderr
    assert_same_losses(run, ref, range(1, 21))  # steps 5-20 again, as the uninterrupted run
    log = (run / "train.log").read_text()
    assert all(f"checkpoint {ckpt} cannot be loaded (rank 1: " in log for ckpt in spoilt.values())
    assert not (tmp_path / "pwned").exists()  # the pickled RNG file never ran


def test_a_named_checkpoint_bad_on_one_rank_is_refused_by_every_rank(reference, tmp_path):
    """The same bad rank-1 file in a checkpoint named by resume=: every process refuses it in
    one line (the fallback test above shows each of the four is found on rank 1)."""
    cfg, ref = reference
    ckpt = _spoil_rank1(ref, tmp_path / "run")["rng_random_bytes"]
    proc = launch(cfg, f"output_dir={tmp_path / 'run'}", f"resume={ckpt}", expect_ok=False)
    assert proc.returncode != 0
    # one line from each process, the same (the two share one pipe: lines may interleave)
    line = f"clipfnd: error: cannot load checkpoint {ckpt}: rank 1: {ckpt}/"
    assert proc.stderr.count(line) == 2, proc.stderr[-3000:]
    _no_raw_traceback(proc.stderr)
    assert not (tmp_path / "pwned").exists()


def _detector(ckpt: Path, **edit) -> None:
    state = json.loads((ckpt / "detector.json").read_text())
    (ckpt / "detector.json").write_text(json.dumps({**state, **edit}))
    _recompute_checksums(ckpt)


def test_a_bad_detector_state_is_skipped_by_every_rank_together(reference, tmp_path):
    """detector.json edited with the checksums recomputed: non-finite offsets in step 20's.
    Both processes skip it together, naming what is wrong, and resume from step 16 (steps
    17-20 equal the uninterrupted run's). The offsets used to be accepted and crash in
    bincount on both processes. (Each other check of detector.json: test_fail_cleanly.)"""
    cfg, ref = reference
    run = tmp_path / "run"
    shutil.copytree(ref, run)
    (run / "summary.json").unlink()
    step = {n: run / "checkpoints" / f"step_{n:08d}" for n in (16, 20)}
    _detector(step[20], offsets={"img": float("nan"), "txt": 1e30})
    proc = launch(cfg, f"output_dir={run}", "resume=latest")
    assert f"checkpoint {step[20]} cannot be loaded (rank 0: " in proc.stderr
    assert "detector.json is not a detector state: detector state offsets.img=nan" in proc.stderr
    assert "step_00000016 (step 16" in proc.stderr
    assert_same_losses(run, ref, range(1, 21))


def _error_lines(p) -> list[str]:
    return [line for line in p.stderr.splitlines() if line.startswith("clipfnd: error:")]


def test_a_checkpoint_write_failing_on_one_rank_stops_every_rank_in_one_line(shapes, tmp_path):
    """Rank 1 cannot write its RNG states (its files are capped at 4 kB: a real write error
    from the OS, as a full disk gives); every rank stops with one line naming rank 1, and no
    checkpoint (nor its temporary folder) is left half-written."""
    run = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml", shapes, run, {**STEPS, "train.max_steps": 8, "data.num_workers": 0}
    )
    procs = launch_machines(cfg, expect_ok=False, preexec={1: file_size_limit(4096)})
    for rank, p in enumerate(procs):
        assert p.returncode != 0, f"rank {rank} exited 0"
        errors = _error_lines(p)
        assert len(errors) == 1, p.stderr[-3000:]
        assert "cannot write the checkpoint of step 4" in errors[0]
        assert "step_00000004.tmp (rank 1: " in errors[0] and "disk full" in errors[0]
        # it was the first: no "newest complete checkpoint is None"
        assert errors[0].endswith(
            "No checkpoint of this run was written yet; free space, then start again"
        )
        _no_raw_traceback(p.stderr)
    assert find_latest(run) is None
    assert not list((run / "checkpoints").glob("step_*"))


def test_shared_memory_full_on_one_rank_stops_every_rank_in_one_line(shapes, tmp_path):
    """Rank 1's loader worker cannot put its samples in shared memory (as when /dev/shm is
    full): PyTorch's queue thread used to print the error and drop the batch, and rank 1
    waited for it forever. Now rank 1 stops with one line saying what to do, and rank 0, whose
    collective finds rank 1 gone, stops with one line too."""
    cfg = write_config(tmp_path / "c.yaml", shapes, tmp_path / "run", STEPS)
    procs = launch_machines(cfg, expect_ok=False, preexec={1: file_size_limit(4096)}, timeout=120)
    assert all(p.returncode != 0 for p in procs)
    (e0,), (e1,) = (_error_lines(p) for p in procs)
    assert "loader worker 0 cannot hand its samples over through shared memory" in e1
    assert "/dev/shm is full or too small" in e1 and "data.num_workers=0" in e1
    assert e0.startswith("clipfnd: error: rank 0: another process of the group stopped"), e0
    for p in procs:
        _no_raw_traceback(p.stderr)


def test_a_model_that_cannot_be_built_stops_every_rank_in_one_line(shapes, tmp_path):
    """A local model config of the user's that open_clip cannot build (a TypeError, not a
    UserError): every rank says so in one line, none waits in a collective."""
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    cfg_json = json.loads(
        (
            Path(__file__).parent.parent / "clipfnd/models/model_configs/clipfnd-tiny-vit.json"
        ).read_text()
    )
    cfg_json["vision_cfg"]["layers"] = "two"
    (model_dir / "open_clip_config.json").write_text(json.dumps({"model_cfg": cfg_json}))
    cfg = write_config(tmp_path / "c.yaml", shapes, tmp_path / "run", STEPS)
    proc = launch(cfg, f"model.name=local-dir:{model_dir}", expect_ok=False, timeout=120)
    assert proc.returncode != 0
    line = f"clipfnd: error: rank 0: cannot build model local-dir:{model_dir}: TypeError"
    assert proc.stderr.count(line) == 2, proc.stderr[-3000:]  # from each process
    _no_raw_traceback(proc.stderr)
    assert not (tmp_path / "run").exists()  # nothing was written
