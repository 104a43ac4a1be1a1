"""What every export format shares: the output folder, the provenance file, the check.

Each export writes only the model's weights (never the optimiser, scheduler or per-sample
tables of the training checkpoint) plus ``clipfnd_export.json``, which records the source
checkpoint, its step, the model name and the full run config. ``--verify`` loads the result
through the target library and compares its embeddings with ours on a fixed batch of images
and captions (:func:`verification_batch`); the largest absolute difference must stay within
``tolerance``.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from safetensors import SafetensorError

from ..checkpoints import LoadedCheckpoint
from ..errors import UserError

EXPORT_RECORD = "clipfnd_export.json"
DEFAULT_TOLERANCE = 1e-4


class UnsupportedExport(UserError):
    """The model cannot be represented in the requested format."""


class VerificationError(UserError):
    """The exported model's embeddings differ from ours by more than the tolerance."""


@dataclass
class Comparison:
    """Largest absolute differences between our embeddings and the exported model's."""

    diffs: dict[str, float] = field(default_factory=dict)
    tolerance: float = DEFAULT_TOLERANCE

    def add(self, name: str, ours: torch.Tensor, theirs: torch.Tensor) -> None:
        if ours.shape != theirs.shape:
            raise VerificationError(
                f"{name}: shapes differ (ours {list(ours.shape)}, exported {list(theirs.shape)})"
            )
        self.diffs[name] = (ours.float() - theirs.float()).abs().max().item()

    @property
    def max_abs_diff(self) -> float:
        return max(self.diffs.values()) if self.diffs else 0.0

    @property
    def passed(self) -> bool:
        return self.max_abs_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {
            "max_abs_diff": dict(self.diffs),
            "tolerance": self.tolerance,
            "passed": self.passed,
        }

    def check(self, fmt: str) -> None:
        if not self.passed:
            worst = ", ".join(f"{k} {v:.3g}" for k, v in self.diffs.items())
            raise VerificationError(
                f"{fmt} export does not reproduce the model: max abs difference {worst} "
                f"(tolerance {self.tolerance:g})"
            )


def verification_batch(image_size: int, seed: int = 0) -> tuple[list[Image.Image], list[str]]:
    """A fixed batch: four RGB images of the model's input size and four captions.

    The images have the model's own size so that every library's resize is the identity and
    only the models are compared (libraries round resize and crop sizes differently).
    """
    rng = np.random.default_rng(seed)
    s = image_size
    ramp = np.linspace(0, 255, s, dtype=np.float32)
    gradient = np.stack(
        [np.tile(ramp, (s, 1)), np.tile(ramp[:, None], (1, s)), np.full((s, s), 128.0, np.float32)],
        axis=-1,
    )
    checker = ((np.indices((s, s)).sum(0) // max(1, s // 8)) % 2 * 255).astype(np.float32)
    arrays = [
        rng.integers(0, 256, (s, s, 3)).astype(np.float32),
        gradient,
        np.repeat(checker[..., None], 3, axis=-1),
        np.broadcast_to(np.array([220.0, 40.0, 40.0], np.float32), (s, s, 3)),
    ]
    images = [Image.fromarray(np.ascontiguousarray(a, dtype=np.uint8)) for a in arrays]
    texts = [
        "a photo of a cat",
        "A RED Circle in the top-left corner!",
        "two  spaces,\tand a tab",
        "a very long caption " * 30,  # longer than any context: truncation must agree
    ]
    return images, texts


@torch.no_grad()
def our_embeddings(
    loaded: LoadedCheckpoint, images: list[Image.Image], texts: list[str]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Normalised image and text embeddings of the checkpoint's model, with its own transforms."""
    b = loaded.bundle
    pixels = torch.stack([b.preprocess_val(im) for im in images])
    image = b.model.encode_image(pixels, normalize=True)
    text = b.model.encode_text(b.tokenizer(texts), normalize=True)
    return image, text


def prepare_out_dir(out: str | Path, overwrite: bool) -> Path:
    """An empty, writable output folder. An existing non-empty one is replaced only if it is an
    export. A path that cannot be a folder (under a file, in a read-only place) is refused in
    one line."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise UserError(
                f"--out {out} exists and is not empty (pass --overwrite to replace "
                "an earlier export)"
            )
        if not (out / EXPORT_RECORD).is_file():
            raise UserError(
                f"--out {out} is not empty and holds no {EXPORT_RECORD}: refusing "
                "to delete a folder that clipfnd did not write"
            )
        with out_errors(out, "cannot replace the earlier export"):
            shutil.rmtree(out)
    with out_errors(out, "cannot write a folder there"):
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".{EXPORT_RECORD}.probe"
        probe.write_text("")
        probe.unlink()
    return out


@contextmanager
def out_errors(out: Path, what: str) -> Iterator[None]:
    """An ``OSError`` in the block (or safetensors' error for the same causes: a full disk) as
    one line naming ``--out`` and the system's reason."""
    try:
        yield
    except OSError as e:
        raise UserError(f"--out {out}: {what} ({e.strerror or e})") from e
    except SafetensorError as e:
        why = (str(e).strip().splitlines() or ["SafetensorError"])[0][:300]
        raise UserError(f"--out {out}: {what} ({why})") from e


def _versions() -> dict[str, str]:
    found = {}
    for dist in ("clipfnd", "torch", "open_clip_torch", "transformers", "timm", "safetensors"):
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            continue
    return found


def write_record(
    out: Path,
    fmt: str,
    loaded: LoadedCheckpoint,
    files: list[str],
    comparison: Comparison | None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write ``clipfnd_export.json``: source checkpoint, step, run config, files, check."""
    record = {
        "format": fmt,
        "source": loaded.describe(),
        "config": loaded.config,
        "files": sorted(files),
        "verify": comparison.to_dict() if comparison else None,
        "versions": _versions(),
        **(extra or {}),
    }
    path = out / EXPORT_RECORD
    path.write_text(json.dumps(record, indent=2, sort_keys=True, default=str) + "\n")
    return path


def state_dict_for_export(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The model's own persistent tensors only, contiguous and detached (safetensors-ready)."""
    return {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
