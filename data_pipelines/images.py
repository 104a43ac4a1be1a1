"""Decoded images to 8-bit RGB, the one rule for training, evaluation and reports.

``PIL.Image.convert("RGB")`` clips high-bit-depth greyscale (modes ``I;16*``, ``I``, ``F``:
16-bit PNGs, TIFFs) to 255, which turns almost every pixel white. Those modes are rescaled
to 8 bits first: 16-bit integers by their full range (``v >> 8``), 32-bit integer and float
images by the range their values occupy. Pillow decodes 16-bit RGB(A) PNGs to 8-bit ``RGB``
itself. Everything else goes through ``convert("RGB")`` (palette, CMYK, LA, ...).
"""

from __future__ import annotations

import numpy as np
from PIL import Image

WIDE_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I", "F")


def to_rgb(im: Image.Image) -> Image.Image:
    """``im`` as 8-bit RGB (see the module docstring)."""
    if im.mode not in WIDE_MODES:
        return im.convert("RGB")
    a = np.asarray(im)
    if im.mode.startswith("I;16"):
        grey = (a.astype(np.uint32) >> 8).astype(np.uint8)
    else:  # 32-bit integers or floats: by the range the values occupy
        a = a.astype(np.float64)
        lo, hi = float(a.min()), float(a.max())
        if lo >= 0 and hi <= 255:
            lo, hi = 0.0, 255.0  # 8-bit values held wide
        elif lo >= 0 and hi <= 65535:
            lo, hi = 0.0, 65535.0  # 16-bit values held wide
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        grey = np.clip((a - lo) * scale, 0, 255).round().astype(np.uint8)
    return Image.fromarray(grey, mode="L").convert("RGB")
