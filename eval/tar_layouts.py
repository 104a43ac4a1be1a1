"""Tar-based evaluation layouts: clipfnd's shard folders and clip_benchmark's WebDataset root.

Both are read shard by shard with :func:`data_pipelines.shards.iter_tar_samples` (members
grouped by key, nothing decoded until an image is used).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from data_pipelines import DataError, load_shard_set
from data_pipelines.shards import IMAGE_EXTENSIONS, iter_tar_samples

from .datasets import EvalDataset, Item, decode_image, read_lines

# clip_benchmark reads images from these keys, in this order
CLIP_BENCHMARK_IMAGE_KEYS = ("webp", "png", "jpg", "jpeg", "0.webp")


def _image_key(sample: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in sample), None)


class ClipfndShards(EvalDataset):
    """``clipfnd data`` output: one caption per sample, ``label`` and ``image_id`` in ``.json``;
    or shards indexed in place by ``clipfnd data index``, read with the loader's rule (the
    samples it leaves out are left out here, and the index is the shard offset plus the
    position among usable samples)."""

    layout = "clipfnd-shards"

    def __init__(self, path: str | os.PathLike):
        shard_set = load_shard_set(path)
        super().__init__(
            shard_set.root, classnames=shard_set.label_names, num_items=shard_set.num_samples
        )
        self.shard_set = shard_set
        self.shards = [s.path for s in shard_set.shards]

    def num_parts(self) -> int:
        return len(self.shards)

    def part_name(self, part: int) -> str:
        return str(self.shards[part])

    def read_part(self, part: int) -> Iterator[Item]:
        ss = self.shard_set
        offset = ss.shards[part].offset
        usable = 0
        for pos, s in enumerate(iter_tar_samples(self.shards[part])):
            ext = _image_key(s, IMAGE_EXTENSIONS)
            if ss.in_place and ss.unusable(s) is not None:
                continue
            try:
                meta = json.loads(s["json"]) if "json" in s else {}
            except (json.JSONDecodeError, UnicodeDecodeError):
                meta = {}
            meta = meta if isinstance(meta, dict) else {}
            caption = s.get("txt", b"").decode("utf-8", errors="replace").strip()
            if ss.in_place:
                index = offset + usable
                usable += 1
            else:
                index = meta.get("index", s["__key__"])
            yield Item(
                position=pos,
                load_image=partial(decode_image, s[ext]) if ext else _missing(s["__key__"]),
                captions=[caption] if caption else [],
                label=ss.label_of(meta),
                image_id=str(meta.get("image_id", index)),
                index=index if isinstance(index, int) else -1,
            )


def _missing(key: str):
    def fail():
        raise DataError(f"sample {key} has no image")

    return fail


def is_clip_benchmark_root(root: Path, split: str) -> bool:
    return (root / split / "nshards.txt").is_file()


class ClipBenchmarkWds(EvalDataset):
    """clip_benchmark's WebDataset layout; ``.cls`` labels and/or ``.txt`` captions (one a line)."""

    layout = "clip_benchmark"

    def __init__(self, root: str | os.PathLike, split: str):
        root = Path(root)
        nshards_file = root / split / "nshards.txt"
        if not nshards_file.is_file():
            raise DataError(f"{root}: no split {split!r} ({nshards_file} does not exist)")
        try:
            nshards = int(nshards_file.read_text().strip())
        except ValueError as e:
            raise DataError(f"{nshards_file} does not hold a shard count: {e}") from e
        self.shards = [root / split / f"{i}.tar" for i in range(nshards)]
        missing = [str(p) for p in self.shards if not p.is_file()]
        if missing:
            raise DataError(f"{nshards_file} says {nshards} shards but {missing[0]} is missing")
        kind_file = root / "dataset_type.txt"
        kind = kind_file.read_text().strip().lower() if kind_file.is_file() else "classification"
        if kind not in ("classification", "retrieval"):
            raise DataError(
                f"{kind_file}: dataset type {kind!r} is not supported (classification or retrieval)"
            )
        classnames = root / "classnames.txt"
        templates = root / "zeroshot_classification_templates.txt"
        super().__init__(
            root,
            split=split,
            kind=kind,
            classnames=read_lines(classnames) if classnames.is_file() else None,
            templates=read_lines(templates) if templates.is_file() else None,
        )

    def num_parts(self) -> int:
        return len(self.shards)

    def part_name(self, part: int) -> str:
        return str(self.shards[part])

    def read_part(self, part: int) -> Iterator[Item]:
        for pos, s in enumerate(iter_tar_samples(str(self.shards[part]))):
            ext = _image_key(s, CLIP_BENCHMARK_IMAGE_KEYS)
            captions = []
            if "txt" in s:
                text = s["txt"].decode("utf-8", errors="replace")
                captions = [c.strip() for c in text.splitlines() if c.strip()]
            label = -1
            if "cls" in s:
                try:
                    label = int(s["cls"].decode("utf-8").strip())
                except ValueError:
                    label = -1
            yield Item(
                position=pos,
                load_image=partial(decode_image, s[ext]) if ext else _missing(s["__key__"]),
                captions=captions,
                label=label,
                image_id=f"{part}/{s['__key__']}",
            )
