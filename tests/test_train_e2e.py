"""End to end: `accelerate launch` on 2 CPU processes trains, checkpoints and resumes exactly."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from runs import assert_same_losses, launch, launch_and_kill, launch_machines, write_config

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


@pytest.fixture(scope="module")
def two_process_run(shapes, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    # no loader workers: the runs that share this config test checkpoints, resumes and reports
    # (each worker process would start a fork server importing torch and open_clip); loader
    # workers across a kill and a resume: test_kill_9_mid_epoch_then_resume_equals_uninterrupted
    extra = {"eval.tasks": "[retrieval,zeroshot]", "data.num_workers": 0}
    cfg = write_config(root / "c.yaml", shapes, root / "run", extra)
    proc = launch(cfg)
    return cfg, root / "run", proc


def test_two_process_run_trains_and_reports(two_process_run):
    _, run, proc = two_process_run
    assert "=== clipfnd run summary ===" in proc.stdout
    summary = json.loads((run / "summary.json").read_text())
    assert summary["processes"] == 2 and summary["steps"] == 16  # 512 samples / 64 x 2 epochs
    assert (run / "config.yaml").exists()
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert {"step", "epoch", "loss", "lr", "logit_scale", "samples_per_sec"} <= set(steps[0])
    # where the time goes (open_clip's data_time / batch_time), seconds per step
    assert all(0 <= r["data_time"] < r["batch_time"] for r in steps)
    first, last = steps[0]["loss"], sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first - 0.3, (first, last)
    assert any("fnd/precision" in r for r in steps if r["epoch"] >= 1)  # detection logged
    assert "i2t_R@1" in summary["eval"] and "t2i_R@5" in summary["eval"]
    assert "zeroshot/top1" in summary["eval"]  # evaluated on both processes, gathered


def test_resume_continues_from_the_checkpoint_step_exactly(two_process_run, tmp_path):
    cfg, run, _ = two_process_run
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == [
        "step_00000004",
        "step_00000008",
        "step_00000012",
        "step_00000016",
    ]
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    for name in ("step_00000008", "step_00000012", "step_00000016"):
        shutil.rmtree(resumed / "checkpoints" / name)
    (resumed / "metrics.jsonl").write_text("")
    proc = launch(cfg, f"output_dir={resumed}", "resume=latest")
    assert "resumed from" in proc.stderr and "step 4" in proc.stderr
    # picks up after step 4, in the middle of epoch 0, and runs through epoch 1
    assert_same_losses(resumed, run, range(5, 17))


def test_existing_run_dir_is_not_overwritten_silently(two_process_run):
    cfg, run, _ = two_process_run
    from clipfnd.cli.main import main

    assert main(["train", str(cfg), "train.epochs=1"]) == 2


@pytest.fixture(scope="module")
def one_process_run(shapes, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e1")
    cfg = write_config(root / "c.yaml", shapes, root / "run")
    launch(cfg, processes=1)
    return cfg, root / "run"


@pytest.mark.parametrize("processes", [1, 2])
def test_kill_9_mid_epoch_then_resume_equals_uninterrupted(
    processes, shapes, one_process_run, two_process_run, tmp_path
):
    """SIGKILL (no clean exit) after step 6; resume=latest restarts from step 4, in the middle
    of epoch 0, and every later loss equals the uninterrupted run's."""
    _, reference = (one_process_run if processes == 1 else two_process_run)[:2]
    run = tmp_path / "run"
    cfg = write_config(tmp_path / "c.yaml", shapes, run)
    launch_and_kill(cfg, run, after_step=6, processes=processes)
    assert not (run / "summary.json").exists()
    launch(cfg, "resume=latest", processes=processes)
    assert_same_losses(run, reference, range(1, 17))


def test_crash_while_writing_a_checkpoint_falls_back_to_a_valid_one(two_process_run, tmp_path):
    """A half-written checkpoint (crash before the rename) is never picked up, and a complete
    one whose weights are corrupt is skipped with a warning for the one before it."""
    cfg, run, _ = two_process_run
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    ckpts = resumed / "checkpoints"
    shutil.rmtree(ckpts / "step_00000016")
    shutil.copytree(ckpts / "step_00000012", ckpts / "step_00000016.tmp")  # crash mid-write
    (ckpts / "step_00000016.tmp" / "trainer_state.json").unlink()
    weights = ckpts / "step_00000012" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # corrupt newest
    (resumed / "metrics.jsonl").write_text("")
    proc = launch(cfg, f"output_dir={resumed}", "resume=latest")
    assert "step_00000012 cannot be loaded" in proc.stderr
    assert proc.stderr.count("every process falls back to") == 1  # said once, by rank 0
    assert_same_losses(resumed, run, range(9, 17))
    assert not (ckpts / "step_00000016.tmp").exists()  # stale temporary folders are cleaned


def test_resume_with_another_config_is_refused(two_process_run, tmp_path):
    cfg, run, _ = two_process_run
    resumed = tmp_path / "other"
    shutil.copytree(run, resumed)
    proc = launch(
        cfg, f"output_dir={resumed}", "resume=latest", "data.batch_size=32", expect_ok=False
    )
    assert proc.returncode != 0
    assert "data.batch_size: checkpoint 64, now 32" in proc.stderr


def test_bf16_with_gradient_accumulation_trains(shapes, tmp_path):
    """Mixed precision through Accelerate and 2 micro-batches per optimiser step, cached (one
    batch of 128 across them) on 2 DDP processes: the passes under ``no_sync`` and the last,
    synchronised one."""
    run = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml",
        shapes,
        run,
        {
            "train.mixed_precision": "bf16",
            "optim.accum_steps": 2,
            "train.epochs": 2,
            "eval.at_end": False,
            "data.num_workers": 0,  # precision and accumulation under test, not the loader
        },
    )
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 99, "loss": 1.0}\n')  # left by a killed attempt
    launch(cfg, processes=2)
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 8  # 16 micro-batches of 64 -> 8 optimiser steps
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, 9))  # a fresh start drops stale lines
    assert all(r["loss"] == r["loss"] and r["loss"] < 10 for r in steps)  # finite
    assert steps[-1]["loss"] < steps[0]["loss"]


def _at_step_4(run: Path, dest: Path) -> Path:
    """A copy of the two-process run as it was at its step 4 checkpoint (later checkpoints,
    metrics and summary gone), to resume."""
    shutil.copytree(run, dest)
    for name in ("step_00000008", "step_00000012", "step_00000016"):
        shutil.rmtree(dest / "checkpoints" / name)
    (dest / "metrics.jsonl").write_text("")
    (dest / "summary.json").unlink()
    return dest


def test_two_machines_resume_like_one_machine_with_two_processes(two_process_run, tmp_path):
    """Two launches of one process each, as two machines (``--num_machines 2 --machine_rank
    0|1``, rendezvous on 127.0.0.1), resume the one-machine, two-process run from its step 4
    checkpoint: the same losses, and a final checkpoint with the same weights and tables.
    Local rank 0 on both: whatever mixed local and global ranks (devices, the data split, who
    writes which file) would show here."""
    import safetensors.torch

    cfg, run, _ = two_process_run
    resumed = _at_step_4(run, tmp_path / "machines")
    procs = launch_machines(cfg, f"output_dir={resumed}", "resume=latest")
    assert "=== clipfnd run summary ===" in procs[0].stdout  # printed by global rank 0 only
    assert "=== clipfnd run summary ===" not in procs[1].stdout
    assert_same_losses(resumed, run, range(5, 17))
    assert json.loads((resumed / "summary.json").read_text())["processes"] == 2
    for name in ("model.safetensors", "tables.safetensors"):
        a = safetensors.torch.load_file(str(run / "checkpoints" / "step_00000016" / name))
        b = safetensors.torch.load_file(str(resumed / "checkpoints" / "step_00000016" / name))
        assert set(a) == set(b), name
        for k in a:
            torch.testing.assert_close(b[k], a[k], atol=1e-6, rtol=0, msg=f"{name}: {k}")
    ckpt = resumed / "checkpoints" / "step_00000016"
    assert sorted(p.name for p in ckpt.glob("loader_rank*.json")) == [
        "loader_rank0.json",
        "loader_rank1.json",
    ]


def test_sharded_state_resumes_a_replicated_run_to_the_same_numbers(two_process_run, tmp_path):
    """``fnd.state=sharded`` resumes the replicated two-process run from its step 4 checkpoint
    (its one tables file split over the ranks): the same losses, and final per-rank table
    files that put back together equal the replicated run's tables."""
    from clipfnd.state.files import read_full_tables

    cfg, run, _ = two_process_run
    resumed = _at_step_4(run, tmp_path / "sharded")
    launch(cfg, f"output_dir={resumed}", "resume=latest", "fnd.state=sharded")
    assert_same_losses(resumed, run, range(5, 17))
    ckpt = resumed / "checkpoints" / "step_00000016"
    assert sorted(p.name for p in ckpt.glob("tables*")) == [
        "tables_rank0_of_2.safetensors",
        "tables_rank1_of_2.safetensors",
    ]
    rows, got = read_full_tables(ckpt)
    rows_ref, want = read_full_tables(run / "checkpoints" / "step_00000016")
    assert rows == rows_ref and set(got) == set(want)
    for k in want:
        torch.testing.assert_close(got[k], want[k], atol=1e-6, rtol=0, msg=k)
