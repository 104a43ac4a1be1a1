"""Evaluation data in several layouts, all read as one stream of items with stable keys.

Layouts (detected from ``--data`` by ``eval.layouts.open_dataset``):

- ``clipfnd-shards``: a folder with ``manifest.json`` and ``shard-*.tar`` (``clipfnd data``);
- ``clip_benchmark``: the WebDataset layout of clip_benchmark,
  ``ROOT/{split}/nshards.txt``, ``ROOT/{split}/0.tar ...``, ``ROOT/classnames.txt``,
  ``ROOT/zeroshot_classification_templates.txt``, ``ROOT/dataset_type.txt``;
- ``csv``: a CSV/TSV file with an image-path column and a caption (and/or label) column;
- ``hf``: a local Hugging Face dataset (``save_to_disk`` folder, or parquet file(s)).

An **item** is one image with its captions (zero or more), its label (-1: none) and its
``image_id`` (items with the same ``image_id`` show the same image). A dataset is a list of
**parts** (shards, or blocks of rows) read in order; an item's key is
``part << 32 | position in part``, so sorting by key gives the dataset order whatever the
number of processes and workers that read it.
"""

from __future__ import annotations

import io
import itertools
import os
import tarfile
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from data_pipelines.images import to_rgb

KEY_SHIFT = 32
IMAGE_COLUMNS = ("image", "img", "filepath", "image_path", "path", "file", "filename", "jpg")
CAPTION_COLUMNS = ("caption", "captions", "text", "title", "sentences", "sentence", "texts", "txt")
LABEL_COLUMNS = ("label", "labels", "class", "cls", "target", "fine_label")
IMAGE_ID_COLUMNS = ("image_id", "img_id", "imgid")


@dataclass
class Item:
    """One image of the dataset; ``load_image`` decodes it only when called."""

    position: int
    load_image: Callable[[], Image.Image]
    captions: list[str] = field(default_factory=list)
    label: int = -1
    image_id: str = ""
    index: int = -1  # the dense dataset index, where the layout has one (clipfnd shards)


@dataclass
class BadPart:
    """A part that could not be read past ``position`` (what was read before stays)."""

    position: int
    name: str
    reason: str


def decode_image(data: bytes) -> Image.Image:
    with Image.open(io.BytesIO(data)) as im:
        return to_rgb(im)


def open_image(path: str | os.PathLike) -> Image.Image:
    with Image.open(path) as im:
        return to_rgb(im)


class EvalDataset(ABC):
    """A read-only dataset for evaluation: parts of items, plus what the data says about it."""

    layout: str = ""

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        split: str | None = None,
        classnames: list[str] | None = None,
        templates: list[str] | None = None,
        num_items: int | None = None,
        kind: str | None = None,
    ):
        self.path = str(path)
        self.split = split
        self.classnames = classnames  # label names when the data has them
        self.templates = templates  # zero-shot templates shipped with the data
        self.num_items = num_items  # when known up front (for the progress bar)
        self.kind = kind  # "retrieval" / "classification" when the data says so

    @abstractmethod
    def num_parts(self) -> int:
        """How many independently readable parts the dataset has."""

    @abstractmethod
    def read_part(self, part: int) -> Iterator[Item]:
        """The items of one part, in order (images not decoded yet)."""

    def iter_slice(self, reader: int, readers: int) -> Iterator[tuple[int, Item]]:
        """``(key, item)`` for reader ``reader`` of ``readers``; the readers cover every item once.

        With at least as many parts as readers each reader takes whole parts; otherwise every
        reader walks all parts and keeps every ``readers``-th item.
        """
        n = self.num_parts()
        if n >= readers:
            for part in range(reader, n, readers):
                for item in self._read_safely(part):
                    yield (part << KEY_SHIFT) | item.position, item
            return
        counter = itertools.count()
        for part in range(n):
            for item in self._read_safely(part):
                if isinstance(item, BadPart):
                    if reader == 0:  # reported once, by the first reader
                        yield (part << KEY_SHIFT) | item.position, item
                    continue
                if next(counter) % readers == reader:
                    yield (part << KEY_SHIFT) | item.position, item

    def _read_safely(self, part: int) -> Iterator[Item | BadPart]:
        """The items of ``part``; a part that cannot be read to its end (a truncated or
        corrupt shard) ends with a ``BadPart`` naming it, instead of an exception."""
        last = -1
        try:
            for item in self.read_part(part):
                last = item.position
                yield item
        except (OSError, EOFError, ValueError, tarfile.TarError) as e:
            yield BadPart(last + 1, self.part_name(part), f"{type(e).__name__}: {e}")

    def part_name(self, part: int) -> str:
        """What a message calls part ``part`` (a shard's path, by default its number)."""
        return f"part {part}"

    def item_name(self, part: int, item: Item) -> str:
        """What a message calls an item of part ``part``: the part, the item's position in it
        and its ``image_id`` (a file path for CSV, a dataset index for clipfnd shards)."""
        image_id = f" (image_id {item.image_id})" if item.image_id else ""
        return f"{self.part_name(part)} item {item.position}{image_id}"

    def describe(self) -> dict[str, Any]:
        return {"path": self.path, "layout": self.layout, "split": self.split}


def read_lines(path: str | os.PathLike) -> list[str]:
    """Non-empty stripped lines of a text file."""
    return [
        line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()
    ]
