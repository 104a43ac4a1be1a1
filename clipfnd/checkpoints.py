"""Reading checkpoints: the folder layout, ``trainer_state.json``, and a checkpoint as an
inference model. A leaf module: training (which writes checkpoints and resumes from them, ``clipfnd.train.save_resume``),
evaluation and export all read through it, and it imports none of them.

A training checkpoint (``RUN/checkpoints/step_NNNNNNNN/``) holds the model's state dict
(``model.safetensors``), ``trainer_state.json`` (step, epoch, world size, model name, full run
config; written last, its presence marks a complete checkpoint), each process's data position
(``loader_rank{r}.json``) and training-only state (optimiser, scheduler, per-sample tables, RNG).
Evaluation and export read only the weights and ``trainer_state.json``.

``RUN_OR_CHECKPOINT`` may be a run directory (its newest checkpoint with weights is used), a
checkpoint directory, or the ``model.safetensors`` file inside one.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

from .errors import CheckpointError
from .models.factory import ClipBundle, create_clip

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
        state = json.loads(path.read_text())
    except FileNotFoundError as e:
        raise CheckpointError(f"{ckpt} is not a complete checkpoint (no {TRAINER_STATE})") from e
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path} is corrupt: {e}") from e
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} is corrupt: not a JSON object")
    for key, low in (("step", 0), ("epoch", 0), ("world_size", 1)):
        value = state.get(key, low)
        if not isinstance(value, int) or isinstance(value, bool) or value < low:
            raise CheckpointError(f"{path} is corrupt: {key}={value!r} is not an integer >= {low}")
    return state


CHECKSUMS = "checksums"  # trainer_state.json: {file name: sha256} of every other file


def file_checksums(ckpt: Path, names: list[str] | None = None) -> dict[str, str]:
    """sha256 of every file of a checkpoint folder but ``trainer_state.json`` (of those in
    ``names`` only, when given; a name that is not a file is left out)."""
    out = {}
    for name in _files(ckpt):
        if names is not None and name not in names:
            continue
        h = hashlib.sha256()
        with open(ckpt / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
        out[name] = h.hexdigest()
    return out


def _files(ckpt: Path) -> list[str]:
    """The files of a checkpoint folder but ``trainer_state.json``, by their path inside it
    (``optimizer_fsdp/shard-00001-...safetensors`` for a file in a subfolder), sorted."""
    return sorted(
        p.relative_to(ckpt).as_posix()
        for p in ckpt.rglob("*")
        if p.is_file() and p.relative_to(ckpt).as_posix() != TRAINER_STATE
    )


def verify_checksums(ckpt: Path, state: dict[str, Any], share: tuple[int, int] = (0, 1)) -> None:
    """Check every file against the checksums recorded when the checkpoint was published; a
    changed, missing or unrecorded file raises ``CheckpointError``. Checkpoints written before
    checksums were recorded are let through with a warning.

    ``share=(r, W)``: only every ``W``-th file from the ``r``-th (in name order), so that ``W``
    processes verify a checkpoint together in the time of one pass over it."""
    recorded = state.get(CHECKSUMS)
    if not isinstance(recorded, dict):
        if share[0] == 0:
            log.warning("%s records no checksums (an older checkpoint): files not verified", ckpt)
        return
    present = _files(ckpt)
    names = sorted(set(recorded) | set(present))[share[0] :: share[1]]
    found = file_checksums(ckpt, names)
    for name in names:
        if name not in found:
            raise CheckpointError(f"{ckpt / name} is missing (the checkpoint recorded it)")
        if name not in recorded:
            raise CheckpointError(f"{ckpt / name} was not part of the checkpoint when written")
        if found[name] != recorded[name]:
            raise CheckpointError(
                f"{ckpt / name} does not match the checksum recorded when the checkpoint was "
                "written: it is corrupt or was changed"
            )


def is_valid(ckpt: Path) -> bool:
    try:
        state = read_trainer_state(ckpt)
    except ValueError:
        return False
    needed = [ckpt / f"loader_rank{r}.json" for r in range(state.get("world_size", 1))]
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


WEIGHTS_NAME = "model.safetensors"


@dataclass
class LoadedCheckpoint:
    """A checkpoint's model (eval mode, on CPU) with its provenance."""

    path: Path  # the checkpoint directory
    run_dir: Path | None
    step: int | None
    epoch: int | None
    model_name: str
    config: dict[str, Any]  # the full run config recorded at training time
    bundle: ClipBundle

    @property
    def model(self) -> torch.nn.Module:
        return self.bundle.model

    def describe(self) -> dict[str, Any]:
        """Provenance for result and export files."""
        return {
            "checkpoint": str(self.path),
            "run_dir": str(self.run_dir) if self.run_dir else None,
            "step": self.step,
            "epoch": self.epoch,
            "model_name": self.model_name,
        }


def _usable(ckpt: Path) -> bool:
    return (ckpt / TRAINER_STATE).is_file() and (ckpt / WEIGHTS_NAME).is_file()


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """The checkpoint directory that ``spec`` (run dir, checkpoint dir or weights file) names."""
    path = Path(spec)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        if path.name != WEIGHTS_NAME:
            raise FileNotFoundError(
                f"{path} is a file; give a run directory, a checkpoint directory "
                f"(RUN/checkpoints/step_NNNNNNNN) or its {WEIGHTS_NAME}"
            )
        path = path.parent
    if (path / WEIGHTS_NAME).is_file():
        if not (path / TRAINER_STATE).is_file():
            raise FileNotFoundError(
                f"{path} has {WEIGHTS_NAME} but no {TRAINER_STATE}, so the model it holds is "
                "unknown (an incomplete checkpoint?)"
            )
        return path
    found = list_checkpoints(path)
    for ckpt in reversed(found):  # newest first; the loader state is not needed here
        if _usable(ckpt):
            return ckpt
        log.warning("skipping %s: no %s or %s", ckpt, WEIGHTS_NAME, TRAINER_STATE)
    if found:
        raise FileNotFoundError(
            f"no checkpoint under {path / 'checkpoints'} has both {WEIGHTS_NAME} and "
            f"{TRAINER_STATE} (checked {len(found)})"
        )
    raise FileNotFoundError(
        f"no checkpoint in {path}: expected a run directory with checkpoints/step_NNNNNNNN/ "
        f"or a checkpoint directory with {WEIGHTS_NAME} and {TRAINER_STATE}"
    )


def check_fits(
    state_dict: dict[str, torch.Tensor], model: torch.nn.Module, model_name: str, source: Path
) -> None:
    """Refuse weights that do not fit ``model`` (missing/unexpected keys, other shapes)."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    shapes = [
        f"{k} (checkpoint {list(state_dict[k].shape)}, model {list(v.shape)})"
        for k, v in expected.items()
        if k in state_dict and state_dict[k].shape != v.shape
    ]
    if not (missing or unexpected or shapes):
        return
    parts = []
    if shapes:
        parts.append(f"{len(shapes)} shape mismatches, e.g. {'; '.join(shapes[:3])}")
    if missing:
        parts.append(f"{len(missing)} missing keys, e.g. {', '.join(missing[:3])}")
    if unexpected:
        parts.append(f"{len(unexpected)} unexpected keys, e.g. {', '.join(unexpected[:3])}")
    raise CheckpointError(
        f"the weights in {source} do not fit model {model_name!r} (the model name recorded in "
        f"{TRAINER_STATE}): {'; '.join(parts)}. Was the checkpoint written for another model?"
    )


def load_checkpoint(spec: str | os.PathLike) -> LoadedCheckpoint:
    """Build the recorded model and load the checkpoint's weights into it (strictly)."""
    ckpt = resolve_checkpoint(spec)
    state = read_trainer_state(ckpt)
    verify_checksums(ckpt, state)
    config = state.get("config") or {}
    model_name = state.get("model_name") or (config.get("model") or {}).get("name")
    if not model_name:
        raise CheckpointError(
            f"{ckpt / TRAINER_STATE} names no model (no model_name, no config.model.name)"
        )
    if config.get("mode", "clip") == "simclr":
        from .models.vision import vision_from_config

        bundle = vision_from_config(config)
    else:
        bundle = create_clip(model_name)
    weights = safetensors.torch.load_file(str(ckpt / WEIGHTS_NAME))
    check_fits(weights, bundle.model, model_name, ckpt / WEIGHTS_NAME)
    bundle.model.load_state_dict(weights, strict=True)
    bundle.model.eval()
    run_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else None
    return LoadedCheckpoint(
        path=ckpt.resolve(),
        run_dir=run_dir.resolve() if run_dir else None,
        step=state.get("step"),
        epoch=state.get("epoch"),
        model_name=model_name,
        config=config,
        bundle=bundle,
    )
