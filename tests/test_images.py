"""High-bit-depth images decode to the right 8-bit RGB in training and evaluation (they used
to turn white), written by the test itself: 16-bit greyscale PNGs through Pillow, 16-bit RGB
PNGs byte by byte."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from clipfnd_eval.datasets import decode_image
from data_pipelines.images import to_rgb


def _png16_rgb(pixels: np.ndarray) -> bytes:
    """A 16-bit-per-channel RGB PNG (colour type 2, bit depth 16) of ``pixels`` [h, w, 3]."""
    h, w, _ = pixels.shape

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    rows = b"".join(b"\x00" + pixels[y].astype(">u2").tobytes() for y in range(h))
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def _png16_grey(values: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(values.astype(np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def test_16_bit_grey_png_keeps_its_intensities():
    ramp = np.tile(np.linspace(0, 65535, 32).astype(np.uint16), (8, 1))
    data = _png16_grey(ramp)
    assert Image.open(io.BytesIO(data)).mode.startswith("I")  # what Pillow makes of it
    rgb = np.asarray(decode_image(data))
    assert rgb.shape == (8, 32, 3)
    np.testing.assert_allclose(rgb[0, :, 0], ramp[0] / 257, atol=1.0)
    assert (rgb == 255).mean() < 0.1  # convert("RGB") alone saturates nearly everything


def test_16_bit_rgb_png_keeps_its_colours():
    px = np.zeros((4, 6, 3), dtype=np.uint16)
    px[..., 0] = 40000
    px[..., 1] = 10000
    px[..., 2] = 60000
    rgb = np.asarray(decode_image(_png16_rgb(px)))
    np.testing.assert_allclose(rgb[0, 0], np.array([40000, 10000, 60000]) / 257, atol=1.0)


@pytest.mark.parametrize("mode", ["I", "F"])
def test_wide_modes_are_rescaled_by_their_range(mode):
    a = np.array([[0, 1000, 65535]], dtype=np.float32 if mode == "F" else np.int32)
    out = np.asarray(to_rgb(Image.fromarray(a, mode=mode)))[0, :, 0]
    np.testing.assert_allclose(out, [0, round(1000 / 257), 255], atol=1)
    eight = np.array([[0, 128, 255]], dtype=np.int32)
    assert np.asarray(to_rgb(Image.fromarray(eight, mode="I")))[0, :, 0].tolist() == [0, 128, 255]


def test_the_training_loader_decodes_16_bit_pngs(tmp_path):
    """Through a real shard and the training stream."""
    import torch
    import torchvision.transforms.v2 as v2

    from data_pipelines.loader import ShardStream
    from data_pipelines.shards import RawSample, load_shard_set, write_split

    ramp = np.tile(np.linspace(0, 65535, 16).astype(np.uint16), (16, 1))
    samples = [
        RawSample(image=_png16_grey(ramp), image_ext="png", caption=f"ramp {i}") for i in range(4)
    ]
    write_split(tmp_path / "s", samples, shard_size=4, progress=False)
    stream = ShardStream(
        load_shard_set(tmp_path / "s"),
        global_batch_size=4,
        image_transform=v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]),
        tokenize=None,
        num_workers=0,
        shuffle_buffer=0,
    )
    batch = next(iter(stream.epoch(0)))
    row = batch["image"][0, 0, 0]
    np.testing.assert_allclose(row.numpy() * 255, ramp[0] / 257, atol=1.0)
