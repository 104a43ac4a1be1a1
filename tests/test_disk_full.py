"""A disk that fills up while a checkpoint or an export is written: one line, nothing lost.

The disk is real: a 45 MB tmpfs mounted for the test where the machine allows it (root), in
which one checkpoint of the tiny model (about 41 MB) fits and a second does not, so the
second fails while ``model.safetensors`` is written ("No space left on device"). Where no
tmpfs can be mounted, the same write fails through a per-file size limit (RLIMIT_FSIZE,
"File too large"): the same failure of a real write, without root.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from clipfnd.checkpoints import find_latest, is_valid

from runs import file_size_limit, write_config

pytestmark = pytest.mark.slow


@contextlib.contextmanager
def small_disk(root: Path, megabytes: int):
    """A folder on a tmpfs of ``megabytes`` (None when this machine cannot mount one)."""
    mnt = root / f"tmpfs-{uuid.uuid4().hex[:8]}"
    mnt.mkdir()
    ok = (
        subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={megabytes}m", "tmpfs", str(mnt)],
            capture_output=True,
        ).returncode
        == 0
        if os.geteuid() == 0
        else False
    )
    try:
        yield mnt if ok else None
    finally:
        if ok:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def _clipfnd(*args: str, limit: int | None = None, timeout: int = 300):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run(
        [sys.executable, "-m", "clipfnd", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        preexec_fn=file_size_limit(limit) if limit else None,
    )


def _errors(proc) -> list[str]:
    return [line for line in proc.stderr.splitlines() if line.startswith("clipfnd: error:")]


def test_a_full_disk_while_writing_the_weights_is_one_line_and_loses_nothing(shapes, tmp_path):
    with small_disk(tmp_path, 45) as disk:
        run = (disk or tmp_path) / "run"
        cfg = write_config(
            tmp_path / "c.yaml",
            shapes,
            run,
            {"train.max_steps": 8, "eval.at_end": False, "data.num_workers": 0},
        )
        # with a tmpfs, the step-4 checkpoint fits and step 8's cannot; without one, the first
        # run writes step 4 unhindered and the resume cannot write more than 8 MB a file
        first = _clipfnd("train", str(cfg), *(() if disk else ("train.max_steps=4",)))
        if disk is None:
            assert first.returncode == 0, first.stderr[-3000:]
            first = _clipfnd("train", str(cfg), "resume=latest", limit=8 << 20)
        assert first.returncode == 2, first.stderr[-3000:]
        (line,) = _errors(first)
        assert "cannot write the checkpoint of step 8" in line
        assert ("No space left on device" if disk else "File too large") in line
        assert "The newest complete checkpoint is" in line and "step_00000004" in line
        assert "Traceback" not in first.stderr
        assert find_latest(run) == run / "checkpoints" / "step_00000004"
        assert is_valid(run / "checkpoints" / "step_00000004")
        assert not (run / "checkpoints" / "step_00000008.tmp").exists()  # its space is freed
        assert [json.loads(x)["step"] for x in (run / "metrics.jsonl").read_text().splitlines()][
            -1
        ] == 8
        assert (
            "clipfnd: error: cannot write the checkpoint of step 8"
            in (run / "train.log").read_text()
        )

        # the same disk for an export: one line too
        out = (disk or tmp_path) / "export"
        proc = _clipfnd(
            "export",
            "--checkpoint",
            str(run),
            "--format",
            "open_clip",
            "--out",
            str(out),
            limit=None if disk else 8 << 20,
        )
        assert proc.returncode == 2, proc.stderr[-3000:]
        (line,) = _errors(proc)
        assert f"--out {out}: cannot write the export" in line, line
        assert "Traceback" not in proc.stderr
