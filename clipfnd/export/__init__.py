"""Exporting a training checkpoint to open_clip, transformers, timm or torchvision.

``export_checkpoint`` reads the checkpoint's model (never its training-only state), writes
one format into an output folder with ``clipfnd_export.json`` (source checkpoint, step, run
config), and, with ``verify=True``, loads the result through the target library and checks
that its embeddings match ours on a fixed batch. Each format lives in its own module:
``open_clip``, ``hf`` (transformers) and ``timm``.

A vision-only checkpoint (run config ``mode: simclr``) has only a backbone: ``vision`` exports
it as ``torchvision`` (a state dict plus how to rebuild it) or ``timm`` (ResNet and ViT
backbones), and refuses ``open_clip`` and ``hf``. ``torchvision`` refuses CLIP checkpoints.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoints import LoadedCheckpoint, load_checkpoint
from ..errors import UserError
from .common import DEFAULT_TOLERANCE, Comparison, out_errors, prepare_out_dir, write_record

FORMATS = ("open_clip", "hf", "timm", "torchvision")


@dataclass
class ExportResult:
    out: Path
    format: str
    files: list[str]
    comparison: Comparison | None
    source: dict[str, Any]


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")


def _format_module(fmt: str, loaded: LoadedCheckpoint):
    """The format's ``check``/``export``/``verify``, chosen by the checkpoint's mode."""
    _check_format(fmt)
    from . import vision

    if fmt == "torchvision" or vision.is_vision(loaded):
        return vision.format_module(fmt, loaded)
    return importlib.import_module(f".{fmt}", __name__)


def export_checkpoint(
    checkpoint: str | os.PathLike | LoadedCheckpoint,
    fmt: str,
    out: str | os.PathLike,
    *,
    verify: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    overwrite: bool = False,
) -> ExportResult:
    """Write ``checkpoint`` in format ``fmt`` (open_clip | hf | timm | torchvision) into ``out``.

    Raises ``UnsupportedExport`` (a ValueError) before writing anything when the format cannot
    represent the model, and ``VerificationError`` when ``verify`` finds a difference above
    ``tolerance`` (the files stay, with the failed check recorded in clipfnd_export.json).
    """
    _check_format(fmt)
    loaded = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint)
    module = _format_module(fmt, loaded)
    module.check(loaded)  # refuses an unrepresentable model before anything is written
    out_dir = prepare_out_dir(out, overwrite)
    with out_errors(out_dir, "cannot write the export"):  # e.g. the disk is full
        files = module.export(loaded, out_dir)
    comparison = module.verify(loaded, out_dir, tolerance) if verify else None
    with out_errors(out_dir, "cannot write the export"):
        record = write_record(out_dir, fmt, loaded, files, comparison)
    if comparison is not None:
        comparison.check(fmt)
    return ExportResult(out_dir, fmt, sorted({*files, record.name}), comparison, loaded.describe())
