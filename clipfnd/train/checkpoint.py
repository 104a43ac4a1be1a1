"""Checkpoints under ``RUN/checkpoints/step_NNNNNNNN``: written atomically, described fully.

A checkpoint is Accelerate's ``save_state`` (model, optimiser, scaler, RNG states of every
process, and registered objects: the scheduler and the per-sample tables) plus:

- ``trainer_state.json``: step, epoch, world size, the full run config;
- ``loader_rank{r}.json``: where each rank's data stream stands inside the epoch.

Everything is written into ``step_N.tmp`` and renamed to ``step_N`` when complete, so
``resume=latest`` never sees a half-written checkpoint; ``trainer_state.json`` is written
last and its presence marks a complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

STEP_RE = re.compile(r"^step_(\d{8})$")
TRAINER_STATE = "trainer_state.json"


def checkpoint_dir(run_dir: str | os.PathLike) -> Path:
    return Path(run_dir) / "checkpoints"


def list_checkpoints(run_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints, oldest first."""
    root = checkpoint_dir(run_dir)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and STEP_RE.match(p.name)]
    return sorted(found, key=lambda p: int(STEP_RE.match(p.name).group(1)))


def read_trainer_state(ckpt: Path) -> dict[str, Any]:
    path = ckpt / TRAINER_STATE
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as e:
        raise ValueError(f"{ckpt} is not a complete checkpoint (no {TRAINER_STATE})") from e
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is corrupt: {e}") from e


def is_valid(ckpt: Path) -> bool:
    try:
        state = read_trainer_state(ckpt)
    except ValueError:
        return False
    needed = [ckpt / f"loader_rank{r}.json" for r in range(int(state.get("world_size", 1)))]
    return all(p.exists() for p in needed)


def find_latest(run_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint; a newer incomplete one is skipped with a warning."""
    for ckpt in reversed(list_checkpoints(run_dir)):
        if is_valid(ckpt):
            return ckpt
        log.warning("checkpoint %s is incomplete or corrupt; falling back to an older one", ckpt)
    return None


def tmp_path(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}.tmp"


def final_path(run_dir: str | os.PathLike, step: int) -> Path:
    return checkpoint_dir(run_dir) / f"step_{step:08d}"


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def publish(run_dir: str | os.PathLike, step: int, trainer_state: dict[str, Any], keep: int) -> Path:
    """(Main process.) Mark ``step_N.tmp`` complete, rename it to ``step_N``, prune old ones."""
    tmp = tmp_path(run_dir, step)
    write_json(tmp / TRAINER_STATE, trainer_state)
    final = final_path(run_dir, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in checkpoint_dir(run_dir).glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return final
