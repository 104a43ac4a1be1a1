"""Exporting a training checkpoint to open_clip, transformers or timm.

``export_checkpoint`` reads the checkpoint's model (never its training-only state), writes
one format into an output folder with ``clipfnd_export.json`` (source checkpoint, step, run
config), and, with ``verify=True``, loads the result through the target library and checks
that its embeddings match ours on a fixed batch. Each format lives in its own module:
``open_clip``, ``hf`` (transformers) and ``timm``.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..checkpoints import LoadedCheckpoint, load_checkpoint
from ..errors import UserError
from .common import DEFAULT_TOLERANCE, Comparison, prepare_out_dir, write_record

FORMATS = ("open_clip", "hf", "timm")


@dataclass
class ExportResult:
    out: Path
    format: str
    files: list[str]
    comparison: Comparison | None
    source: dict[str, Any]


def _format_module(fmt: str):
    if fmt not in FORMATS:
        raise UserError(f"unknown export format {fmt!r}; choose one of {', '.join(FORMATS)}")
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
    """Write ``checkpoint`` in format ``fmt`` (open_clip | hf | timm) into ``out``.

    Raises ``UnsupportedExport`` (a ValueError) before writing anything when the format cannot
    represent the model, and ``VerificationError`` when ``verify`` finds a difference above
    ``tolerance`` (the files stay, with the failed check recorded in clipfnd_export.json).
    """
    module = _format_module(fmt)
    loaded = checkpoint if isinstance(checkpoint, LoadedCheckpoint) else load_checkpoint(checkpoint)
    module.check(loaded)  # refuses an unrepresentable model before anything is written
    out_dir = prepare_out_dir(out, overwrite)
    files = module.export(loaded, out_dir)
    comparison = module.verify(loaded, out_dir, tolerance) if verify else None
    record = write_record(out_dir, fmt, loaded, files, comparison)
    if comparison is not None:
        comparison.check(fmt)
    return ExportResult(out_dir, fmt, sorted({*files, record.name}), comparison, loaded.describe())
