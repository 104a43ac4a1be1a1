"""Shards shaped like img2dataset's output, written by the tests (and the indexing benchmark).

img2dataset writes ``DIR/00000.tar`` with members ``000000123.jpg``/``.txt``/``.json`` (the
key is the shard number and the position, zero-padded; the ``.json`` holds url, caption,
status, sizes), and ``DIR/00000_stats.json`` with its counts. Here some samples are made
unusable on purpose (a failed download with no image, an empty caption, a zero-byte image)
and every usable sample's ``.json`` has ``"class": expected_index % CLASSES``, so a test can
check the index the loader gives against the one it should be.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

import webdataset as wds
from PIL import Image

CLASSES = 13
COLOURS = [(200, 40, 40), (40, 200, 40), (40, 40, 200), (200, 200, 40), (40, 200, 200)]


def _jpegs(size: int, noise: bool) -> list[bytes]:
    """Five JPEGs: flat colours, or noise (bytes about the size of real photos)."""
    out = []
    for i, c in enumerate(COLOURS):
        im = Image.new("RGB", (size, size), c)
        if noise:
            im = Image.frombytes("RGB", (size, size), random.Random(i).randbytes(size * size * 3))
        buf = io.BytesIO()
        im.save(buf, format="JPEG", quality=90)
        out.append(buf.getvalue())
    return out


def photo_jpeg(seed: int, size: tuple[int, int]) -> bytes:
    """A JPEG (quality 90) of a smooth random field (6 x 6 colours, bicubic) with noise on top:
    edges, texture and about the bytes per pixel of a photo (the loader benchmark, the pixel
    tests)."""
    import numpy as np

    g = np.random.default_rng(seed)
    coarse = Image.fromarray(g.uniform(0, 255, (6, 6, 3)).astype(np.uint8))
    a = np.asarray(coarse.resize(size, Image.BICUBIC)).astype(np.float32)
    a = a + g.normal(0, 10, a.shape)
    buf = io.BytesIO()
    Image.fromarray(a.clip(0, 255).astype(np.uint8)).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def unusable_kind(shard: int, pos: int) -> str | None:
    """Which samples are made unusable (None: usable): a fixed pattern per position."""
    j = (pos + 3 * shard) % 12
    return {3: "failed", 7: "empty caption", 10: "zero-byte"}.get(j)


def write_shards(
    root: str | Path,
    num_shards: int,
    per_shard: int,
    *,
    image_size: int = 16,
    first_shard: int = 0,
    offset: int = 0,
    stats: bool = True,
    noise: bool = False,
) -> int:
    """Write ``num_shards`` shards of ``per_shard`` raw samples into ``root``; return the
    number of usable samples (their expected indices run from ``offset``)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    images = _jpegs(image_size, noise)
    n = offset
    for s in range(first_shard, first_shard + num_shards):
        successes = failed = 0
        with wds.TarWriter(str(root / f"{s:05d}.tar")) as tar:
            for pos in range(per_shard):
                key = f"{s:05d}{pos:04d}"
                kind = unusable_kind(s, pos)
                caption = "" if kind == "empty caption" else f"a photo number {pos} of shard {s}"
                meta = {
                    "url": f"https://example.com/{key}.jpg",
                    "key": key,
                    "caption": caption,
                    "status": "failed_to_download" if kind == "failed" else "success",
                    "error_message": "404" if kind == "failed" else None,
                }
                sample = {"__key__": key, "txt": caption.encode()}
                if kind != "failed":
                    sample["jpg"] = b"" if kind == "zero-byte" else images[(n + pos) % len(images)]
                    meta |= {"width": image_size, "height": image_size}
                    successes += 1
                else:
                    failed += 1
                if kind is None:
                    meta["class"] = n % CLASSES
                    n += 1
                sample["json"] = json.dumps(meta).encode()
                tar.write(sample)
        if stats:
            (root / f"{s:05d}_stats.json").write_text(
                json.dumps(
                    {
                        "count": per_shard,
                        "successes": successes,
                        "failed_to_download": failed,
                        "failed_to_resize": 0,
                    }
                )
            )
    return n - offset
