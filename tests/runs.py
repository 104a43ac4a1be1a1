"""Launching real training runs from tests: configs, `accelerate launch`, kill -9, metrics."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def write_config(path: Path, shapes: Path, run_dir: Path, extra: dict | None = None) -> Path:
    """A small CLIP+GloFND run on the test shapes: 16 steps over 2 epochs, a checkpoint every 4."""
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
        # the per-anchor measure at each epoch's end is tested in test_glofnd_calibration.py
        "fnd.calibration_bank": 0,
        "train.epochs": 2,
        "train.log_every": 1,
        "train.checkpoint_every": 4,
        "train.keep_checkpoints": 10,
        "train.progress": False,
        "train.report_to": "none",
        "train.plots": False,
        "eval.batch_size": 128,
    }
    lines.update(extra or {})
    from omegaconf import OmegaConf

    dotlist = [
        f"{k}={json.dumps(v) if v is None or isinstance(v, bool) else v}" for k, v in lines.items()
    ]
    path.write_text(OmegaConf.to_yaml(OmegaConf.from_dotlist(dotlist)))
    return path


def launch(
    config: Path,
    *overrides: str,
    processes: int = 2,
    timeout: int = 400,
    expect_ok: bool = True,
    fsdp: bool = False,
) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(
        launch_cmd(config, overrides, processes, fsdp),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )
    if expect_ok:
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-6000:]
    return proc


def losses(run_dir: Path) -> dict[int, float]:
    """Loss per step from metrics.jsonl (a step logged twice, e.g. after a resume: the last)."""
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        if not line.endswith("}"):
            continue  # a line cut short by a kill
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec["loss"]
    return out


def launch_cmd(
    config: Path, overrides: tuple[str, ...], processes: int, fsdp: bool = False
) -> list[str]:
    """``accelerate launch`` of ``processes`` (DDP; ``fsdp``: FSDP2) or, for one, ``python -m``."""
    if processes > 1:
        return [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            *(["--use_fsdp", "--fsdp_version", "2"] if fsdp else ["--multi_gpu"]),
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(free_port()),
            "-m",
            "clipfnd",
            "train",
            str(config),
            *overrides,
        ]
    return [sys.executable, "-m", "clipfnd", "train", str(config), *overrides]


def launch_and_kill(
    config: Path,
    run_dir: Path,
    after_step: int,
    *overrides: str,
    processes: int = 2,
    timeout: float = 300,
    fsdp: bool = False,
) -> None:
    """Start a run and SIGKILL its whole process group once ``after_step`` is logged."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    log_path = run_dir.parent / f"{run_dir.name}.killed.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            launch_cmd(config, overrides, processes, fsdp),
            stdout=log,
            stderr=log,
            env=env,
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    raise AssertionError(
                        f"the run ended before it could be killed: {log_path.read_text()[-3000:]}"
                    )
                logged = losses(run_dir) if (run_dir / "metrics.jsonl").exists() else {}
                if logged and max(logged) >= after_step:
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                    return
                time.sleep(0.02)
            raise AssertionError(f"step {after_step} not reached in {timeout}s")
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def assert_same_losses(run: Path, reference: Path, steps: range) -> None:
    """``run`` logged exactly ``steps``, each with the reference run's loss (1e-6)."""
    got, want = losses(run), losses(reference)
    assert sorted(got) == list(steps), sorted(got)
    for step in got:
        assert abs(got[step] - want[step]) <= 1e-6, (step, got[step], want[step])


def file_size_limit(limit: int):
    """A ``preexec_fn`` that caps the size of any file the process (and its children) writes
    at ``limit`` bytes: a write past it fails with EFBIG ("File too large"), as a full disk
    fails one; SIGXFSZ is ignored so that the write fails instead of killing the process."""

    def apply() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def launch_machines(
    config: Path,
    *overrides: str,
    machines: int = 2,
    timeout: int = 400,
    expect_ok: bool = True,
    preexec: dict | None = None,
) -> list[subprocess.CompletedProcess]:
    """``machines`` launches of one process each, as on separate machines
    (``--num_machines/--machine_rank``, rendezvous on 127.0.0.1): one group of ``machines``
    processes, each its machine's only (local rank 0) process. ``preexec``: a
    ``preexec_fn`` per rank (e.g. ``file_size_limit`` on one rank only)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    port = str(free_port())
    procs = []
    for rank in range(machines):
        cmd = [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            str(machines),
            "--num_machines",
            str(machines),
            "--machine_rank",
            str(rank),
            "--main_process_ip",
            "127.0.0.1",
            "--main_process_port",
            port,
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "-m",
            "clipfnd",
            "train",
            str(config),
            *overrides,
        ]
        procs.append(
            subprocess.Popen(
                cmd,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
                preexec_fn=(preexec or {}).get(rank),
            )
        )
    done = []
    for p in procs:
        out, err = p.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    for i, d in enumerate(done):
        if expect_ok:
            assert d.returncode == 0, f"machine {i}:\n{d.stdout[-2000:]}\n{d.stderr[-6000:]}"
    return done


def torchrun_clipfnd(*args: str, processes: int = 2, timeout: int = 300):
    """``clipfnd ARGS`` on ``processes`` CPU processes started by torchrun (what
    ``accelerate launch`` starts too), offline."""
    env = {
        **os.environ,
        "ACCELERATE_USE_CPU": "1",
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
    }
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc_per_node",
        str(processes),
        "--master_addr",
        "127.0.0.1",
        "--master_port",
        str(free_port()),
        "-m",
        "clipfnd",
        *args,
    ]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
