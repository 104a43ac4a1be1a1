"""Changing shards the tests wrote: rewrite a shard member by member, spoil samples in a copy."""

from __future__ import annotations

import io
import shutil
import tarfile
from pathlib import Path

from data_pipelines.shards import iter_tar_samples

EXTS = ("jpg", "json", "txt")


def read_shard(path: Path) -> list[dict]:
    return list(iter_tar_samples(str(path)))


def write_shard(path: Path, samples: list[dict], exts: tuple[str, ...] = EXTS) -> None:
    """``path`` rewritten to hold ``samples`` (their ``exts`` members, in order)."""
    with tarfile.open(path, "w") as tf:
        for s in samples:
            for ext in exts:
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(s[ext])
                tf.addfile(info, io.BytesIO(s[ext]))


def corrupt_copy(split: Path, dst: Path, shards: tuple[str, ...] = ("shard-000000.tar",)) -> Path:
    """A copy of ``split`` whose ``shards`` each have a corrupt image (sample 3), a zero-byte
    image (5) and an empty caption (7): three bad samples a shard."""
    shutil.copytree(split, dst)
    for name in shards:
        samples = read_shard(dst / name)
        samples[3]["jpg"] = b"\xff\xd8 not a jpeg"
        samples[5]["jpg"] = b""
        samples[7]["txt"] = b"   "
        write_shard(dst / name, samples)
    return dst
