"""End to end: `accelerate launch` on 2 CPU processes trains, checkpoints and resumes exactly."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.distributed]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, shapes: Path, run_dir: Path, **extra) -> Path:
    lines = {
        "output_dir": str(run_dir),
        "model.name": "clipfnd-tiny-vit",
        "data.train": str(shapes / "train"),
        "data.val": str(shapes / "val"),
        "data.batch_size": 64,
        "data.num_workers": 1,
        "data.shuffle_buffer": 100,
        "optim.lr": 2e-3,
        "optim.warmup_steps": 2,
        "fnd.detector": "glofnd",
        "fnd.alpha": 0.06,
        "fnd.lr": 0.1,
        "fnd.start_mask": 1,
        "train.epochs": 2,
        "train.log_every": 1,
        "train.checkpoint_every": 4,
        "train.keep_checkpoints": 10,
        "train.progress": False,
        "train.tensorboard": False,
        "eval.batch_size": 128,
    }
    lines.update(extra)
    from omegaconf import OmegaConf

    dotlist = [f"{k}={json.dumps(v) if isinstance(v, bool) else v}" for k, v in lines.items()]
    path.write_text(OmegaConf.to_yaml(OmegaConf.from_dotlist(dotlist)))
    return path


def launch(config: Path, *overrides: str, processes: int = 2, timeout: int = 400) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    if processes > 1:
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes",
               str(processes), "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
               "--main_process_port", str(free_port()), "-m", "clipfnd", "train", str(config), *overrides]
    else:
        cmd = [sys.executable, "-m", "clipfnd", "train", str(config), *overrides]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


@pytest.fixture(scope="module")
def two_process_run(shapes, tmp_path_factory):
    root = tmp_path_factory.mktemp("e2e")
    cfg = write_config(root / "c.yaml", shapes, root / "run")
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
    first, last = steps[0]["loss"], sum(r["loss"] for r in steps[-3:]) / 3
    assert last < first - 0.3, (first, last)
    assert any("fnd/precision" in r for r in steps if r["epoch"] >= 1)  # detection logged
    assert "i2t_R@1" in summary["eval"] and "t2i_R@5" in summary["eval"]


def test_resume_continues_from_the_checkpoint_step_exactly(two_process_run, tmp_path):
    cfg, run, _ = two_process_run
    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == [
        "step_00000004", "step_00000008", "step_00000012", "step_00000016"]
    resumed = tmp_path / "resumed"
    shutil.copytree(run, resumed)
    for name in ("step_00000008", "step_00000012", "step_00000016"):
        shutil.rmtree(resumed / "checkpoints" / name)
    (resumed / "metrics.jsonl").write_text("")
    proc = launch(cfg, f"output_dir={resumed}", "resume=latest")
    assert "resumed from" in proc.stderr and "step 4" in proc.stderr
    got, want = losses(resumed), losses(run)
    # picks up after step 4, in the middle of epoch 0, and runs through epoch 1
    assert sorted(got) == list(range(5, 17))
    for step in got:
        assert got[step] == pytest.approx(want[step], abs=1e-6), step


def test_existing_run_dir_is_not_overwritten_silently(two_process_run):
    cfg, run, _ = two_process_run
    from clipfnd.cli.main import main

    assert main(["train", str(cfg), "train.epochs=1"]) == 2
