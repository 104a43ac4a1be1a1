"""Writing a small checkpoint the way training does, without training (for eval/export tests)."""

from __future__ import annotations

import json
from pathlib import Path

import safetensors.torch
import torch

from clipfnd.models import create_clip


def write_checkpoint(
    run: Path,
    weights_of: str = "clipfnd-tiny-vit",
    recorded_name: str | None = None,
    *,
    seed: int = 0,
    step: int = 1,
    epoch: int = 0,
    logit_scale: float | None = None,
    extra_files: tuple[str, ...] = (),
    config: dict | None = None,
) -> Path:
    """``RUN/checkpoints/step_N`` with the weights of a fresh ``weights_of`` model (seeded) and a
    trainer_state.json naming ``recorded_name`` (default: the same). Returns ``run``."""
    name = recorded_name or weights_of
    torch.manual_seed(seed)
    model = create_clip(weights_of).model
    if logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(logit_scale)
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    safetensors.torch.save_file(model.state_dict(), str(ckpt / "model.safetensors"))
    for junk in extra_files:  # e.g. training-only state an export must leave behind
        (ckpt / junk).write_bytes(b"training state")
    state = {
        "step": step,
        "epoch": epoch,
        "world_size": 1,
        "model_name": name,
        "config": {"model": {"name": name}, **(config or {})},
    }
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    return run
