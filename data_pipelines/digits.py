"""scikit-learn's handwritten digits as a small, real, offline image-text dataset.

1797 real 8x8 greyscale digits (shipped inside scikit-learn), upscaled to ``image_size``,
captioned from templates ("a photo of the digit seven", ...), labelled with their class.
A seeded permutation splits them into train and val.
"""

from __future__ import annotations

import io
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
from PIL import Image

from .shards import RawSample, ShardSet, write_split

DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = (
    "a photo of the digit {name}",
    "a handwritten {name}",
    "the number {d}, written by hand",
    "a scan of a handwritten digit {d}",
    "{name}",
)


def generate(
    split: str = "train", *, seed: int = 0, val_fraction: float = 0.2, image_size: int = 32
) -> Iterator[RawSample]:
    from sklearn.datasets import load_digits

    if split not in ("train", "val"):
        raise ValueError(f"digits split must be 'train' or 'val', got {split!r}")
    digits = load_digits()
    order = np.random.default_rng([seed, 31]).permutation(len(digits.images))
    n_val = int(round(len(order) * val_fraction))
    chosen = order[:n_val] if split == "val" else order[n_val:]
    for i, k in enumerate(chosen):
        rng = np.random.default_rng([seed, 0 if split == "train" else 1, i])
        label = int(digits.target[k])
        pixels = (digits.images[k] * (255.0 / 16.0)).clip(0, 255).astype(np.uint8)
        im = Image.fromarray(pixels, mode="L").resize((image_size, image_size), Image.BILINEAR)
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="PNG")
        template = TEMPLATES[rng.integers(len(TEMPLATES))]
        yield RawSample(
            image=buf.getvalue(),
            image_ext="png",
            caption=template.format(name=DIGIT_NAMES[label], d=label),
            label=label,
            source=f"digits:{split}:{int(k)}",
        )


def label_names() -> list[str]:
    return list(DIGIT_NAMES)


def write_splits(
    out: str | os.PathLike,
    *,
    seed: int = 0,
    image_size: int = 32,
    shard_size: int = 400,
    progress: bool = True,
) -> dict[str, ShardSet]:
    """Write the train and val splits as shards under ``out/train`` and ``out/val``."""
    return {
        split: write_split(
            Path(out) / split,
            generate(split, seed=seed, image_size=image_size),
            shard_size=shard_size,
            label_names=label_names(),
            meta={"source": "sklearn digits", "split": split, "seed": seed},
            desc=f"digits {split}",
            progress=progress,
        )
        for split in ("train", "val")
    }
