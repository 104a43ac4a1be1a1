"""Tar-based evaluation layouts: clipfnd's shard folders and clip_benchmark's WebDataset root.

Both are read shard by shard with :func:`data_pipelines.shards.iter_tar_samples` (members
grouped by key, nothing decoded until an image is used). A caption whose bytes are not UTF-8 is
left out rather than evaluated as replacement characters (the item keeps its image and its
other captions); each shard's are counted and named in one warning.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path

from data_pipelines import DataError, load_shard_set
from data_pipelines.shards import IMAGE_EXTENSIONS, iter_tar_samples

from .datasets import EvalDataset, Item, decode_image, read_lines

# clip_benchmark reads images from these keys, in this order
CLIP_BENCHMARK_IMAGE_KEYS = ("webp", "png", "jpg", "jpeg", "0.webp")

log = logging.getLogger(__name__)


def _image_key(sample: dict, keys: tuple[str, ...]) -> str | None:
    return next((k for k in keys if k in sample), None)


class _Captions:
    """Decodes one shard's captions; those that are not UTF-8 are left out, counted, and
    named in one warning when the shard ends (``report``)."""

    def __init__(self, shard: str):
        self.shard = shard
        self.dropped: list[str] = []  # "KEY (where decoding failed)", one per caption left out

    def text(self, data: bytes, key: str) -> str | None:
        try:
            return data.decode("utf-8")
        except UnicodeDecodeError as e:
            self.dropped.append(f"{key} ({e.reason} at byte {e.start})")
            return None

    def lines(self, data: bytes, key: str) -> list[str]:
        """One caption a line; only the lines that are not UTF-8 are left out."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            parts = (self.text(line, key) for line in data.splitlines())
            text = "\n".join(t for t in parts if t is not None)
        return [c.strip() for c in text.splitlines() if c.strip()]

    def report(self) -> None:
        if self.dropped:
            more = f" and {len(self.dropped) - 3} more" if len(self.dropped) > 3 else ""
            log.warning(
                "%s: left out %d caption(s) that are not UTF-8: sample %s%s",
                self.shard,
                len(self.dropped),
                ", sample ".join(self.dropped[:3]),
                more,
            )


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
        captions = _Captions(self.shards[part])
        try:
            yield from self._items(part, captions)
        finally:
            captions.report()

    def _items(self, part: int, captions: _Captions) -> Iterator[Item]:
        ss = self.shard_set
        offset = ss.shards[part].offset
        usable = 0
        for pos, s in enumerate(iter_tar_samples(self.shards[part], ss.shards[part], ss.manifest)):
            ext = _image_key(s, IMAGE_EXTENSIONS)
            if ss.in_place and ss.unusable(s) is not None:
                continue
            try:
                meta = json.loads(s["json"]) if "json" in s else {}
            except (json.JSONDecodeError, UnicodeDecodeError):
                meta = {}
            meta = meta if isinstance(meta, dict) else {}
            caption = (captions.text(s.get("txt", b""), s["__key__"]) or "").strip()
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
        captions = _Captions(str(self.shards[part]))
        try:
            yield from self._items(part, captions)
        finally:
            captions.report()

    def _items(self, part: int, captions: _Captions) -> Iterator[Item]:
        for pos, s in enumerate(iter_tar_samples(str(self.shards[part]))):
            ext = _image_key(s, CLIP_BENCHMARK_IMAGE_KEYS)
            texts = captions.lines(s["txt"], s["__key__"]) if "txt" in s else []
            label = -1
            if "cls" in s:
                try:
                    label = int(s["cls"].decode("utf-8").strip())
                except ValueError:
                    label = -1
            yield Item(
                position=pos,
                load_image=partial(decode_image, s[ext]) if ext else _missing(s["__key__"]),
                captions=texts,
                label=label,
                image_id=f"{part}/{s['__key__']}",
            )
