"""Table evaluation layouts: CSV/TSV files and local Hugging Face datasets.

Columns are found by name (``--image-column``/``--caption-column``/``--label-column`` override):
an image column (a path, relative to the table's folder, or a ``datasets.Image``), a caption
column (a string, or a list of strings for several captions per image), an optional label
column (integers, strings, or a ``datasets.ClassLabel``) and an optional ``image_id`` column.
In a CSV, rows that name the same image are one item with several captions. The parquet files
of one split are found by their names (``data_pipelines.splits``, the rule ``clipfnd data build``
follows too).
"""

from __future__ import annotations

import csv
import os
from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

from data_pipelines import DataError
from data_pipelines.images import to_rgb
from data_pipelines.labels import label_map
from data_pipelines.splits import choose_split

from .datasets import (
    CAPTION_COLUMNS,
    IMAGE_COLUMNS,
    IMAGE_ID_COLUMNS,
    LABEL_COLUMNS,
    EvalDataset,
    Item,
    decode_image,
    open_image,
)

ROWS_PER_PART = 1000


def _pick(
    columns: list[str],
    wanted: str | None,
    candidates: tuple[str, ...],
    what: str,
    where: str,
    required: bool,
) -> str | None:
    if wanted is not None:
        if wanted not in columns:
            raise DataError(f"{where}: no column {wanted!r} for the {what} (columns: {columns})")
        return wanted
    lower = {c.lower(): c for c in columns}
    found = next((lower[c] for c in candidates if c in lower), None)
    if found is None and required:
        raise DataError(
            f"{where}: no {what} column (looked for {', '.join(candidates)}; "
            f"columns: {columns}); name it with --{what}-column"
        )
    return found


def _label_ids(values: list[Any], where: str) -> tuple[list[int], list[str] | None]:
    """Ids by ``data_pipelines.labels``' rule; a missing value (None, empty) is -1 (unlabelled).
    Names only for string labels: integer ids name no class by themselves."""

    def missing(v: Any) -> bool:
        return v is None or (isinstance(v, str) and not v.strip())

    labels = label_map((v for v in values if not missing(v)), where)
    ids = [-1 if missing(v) else labels.to_int[v] for v in values]
    return ids, labels.names if labels.from_strings else None


class CsvTable(EvalDataset):
    """A CSV/TSV table of image paths with captions and/or labels."""

    layout = "csv"

    def __init__(
        self,
        path: str | os.PathLike,
        *,
        image_column: str | None = None,
        caption_column: str | None = None,
        label_column: str | None = None,
    ):
        path = Path(path)
        delimiter = "\t" if path.suffix.lower() == ".tsv" else ","
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f, delimiter=delimiter))
        if not rows:
            raise DataError(f"{path}: no rows")
        columns = list(rows[0].keys())
        img = _pick(columns, image_column, IMAGE_COLUMNS, "image", str(path), True)
        cap = _pick(columns, caption_column, CAPTION_COLUMNS, "caption", str(path), False)
        lab = _pick(columns, label_column, LABEL_COLUMNS, "label", str(path), False)
        iid = _pick(columns, None, IMAGE_ID_COLUMNS, "image_id", str(path), False)
        if cap is None and lab is None:
            raise DataError(f"{path}: neither a caption nor a label column (columns: {columns})")
        labels, names = _label_ids(
            [(r[lab] or "").strip() for r in rows] if lab else [""] * len(rows),
            f"{path} column {lab!r}",
        )
        groups: dict[str, dict[str, Any]] = {}
        for row, label in zip(rows, labels, strict=True):
            file = (row[img] or "").strip()
            key = (row[iid] or "").strip() if iid else file
            g = groups.setdefault(key, {"file": file, "captions": [], "label": label})
            caption = (row[cap] or "").strip() if cap else ""
            if caption:
                g["captions"].append(caption)
        self.root = path.parent
        self.items = list(groups.items())
        super().__init__(path, classnames=names, num_items=len(self.items))

    def num_parts(self) -> int:
        return (len(self.items) + ROWS_PER_PART - 1) // ROWS_PER_PART

    def read_part(self, part: int) -> Iterator[Item]:
        start = part * ROWS_PER_PART
        for pos, (key, g) in enumerate(self.items[start : start + ROWS_PER_PART]):
            file = Path(g["file"])
            yield Item(
                pos,
                partial(open_image, file if file.is_absolute() else self.root / file),
                list(g["captions"]),
                g["label"],
                key,
            )


def is_saved_hf_dataset(path: Path) -> bool:
    return (path / "dataset_dict.json").is_file() or (path / "state.json").is_file()


def _image_loader(value: Any, root: Path):
    """A loader for whatever a datasets row holds as its image."""
    if hasattr(value, "convert"):  # already a PIL image
        return lambda: to_rgb(value)
    if isinstance(value, dict):
        if value.get("bytes"):
            return partial(decode_image, value["bytes"])
        value = value.get("path")
    if isinstance(value, str) and value:
        p = Path(value)
        return partial(open_image, p if p.is_absolute() else root / p)
    raise DataError(f"cannot read an image from {type(value).__name__} {value!r:.80}")


class HFTable(EvalDataset):
    """A local Hugging Face ``datasets.Dataset`` (nothing is downloaded)."""

    layout = "hf"

    def __init__(
        self,
        dataset: Any,
        path: Path,
        *,
        split: str | None,
        image_column: str | None = None,
        caption_column: str | None = None,
        label_column: str | None = None,
    ):
        import datasets

        features = dataset.features
        columns = list(features)
        where = str(path)
        img = image_column or next(
            (c for c, f in features.items() if isinstance(f, datasets.Image)), None
        )
        img = _pick(columns, img, IMAGE_COLUMNS, "image", where, True)
        cap = _pick(columns, caption_column, CAPTION_COLUMNS, "caption", where, False)
        lab = label_column or next(
            (c for c, f in features.items() if isinstance(f, datasets.ClassLabel)), None
        )
        lab = _pick(columns, lab, LABEL_COLUMNS, "label", where, False)
        if cap is None and lab is None:
            raise DataError(f"{where}: neither a caption nor a label column (columns: {columns})")
        classnames = (
            features[lab].names if lab and isinstance(features[lab], datasets.ClassLabel) else None
        )
        self._label_ids: list[int] | None = None  # labels that are not a ClassLabel: numbered here
        if lab and classnames is None:
            self._label_ids, classnames = _label_ids(dataset[lab], f"{where} column {lab!r}")
        iid = _pick(columns, None, IMAGE_ID_COLUMNS, "image_id", where, False)
        self.columns = {"image": img, "caption": cap, "label": lab, "image_id": iid}
        self.dataset = dataset
        self._images = dataset.select_columns([img])
        self._meta = dataset.select_columns([c for c in (cap, lab, self.columns["image_id"]) if c])
        self.root = path if path.is_dir() else path.parent
        super().__init__(path, split=split, classnames=classnames, num_items=len(dataset))

    @classmethod
    def from_disk(
        cls, path: Path, *, split: str | None, default_split: str, **columns: str | None
    ) -> HFTable:
        import datasets

        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            split = choose_split(list(loaded), split, default_split, str(path))
            loaded = loaded[split]
        return cls(loaded, path, split=split, **columns)

    @classmethod
    def from_parquet(
        cls, files: list[Path], path: Path, *, split: str | None, **columns: str | None
    ) -> HFTable:
        import datasets

        loaded = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
        return cls(loaded, path, split=split, **columns)

    def num_parts(self) -> int:
        return (len(self.dataset) + ROWS_PER_PART - 1) // ROWS_PER_PART

    def read_part(self, part: int) -> Iterator[Item]:
        start = part * ROWS_PER_PART
        stop = min(start + ROWS_PER_PART, len(self.dataset))
        cols = self.columns
        for pos, row_no in enumerate(range(start, stop)):
            yield self._item(pos, row_no, cols)

    def _item(self, pos: int, row_no: int, cols: dict[str, str | None]) -> Item:
        def load():
            return _image_loader(self._images[row_no][cols["image"]], self.root)()

        row = self._meta[row_no]
        captions = row.get(cols["caption"]) if cols["caption"] else None
        if isinstance(captions, str):
            captions = [captions]
        captions = [c.strip() for c in captions or [] if isinstance(c, str) and c.strip()]
        if self._label_ids is not None:
            label = self._label_ids[row_no]
        else:
            label = row.get(cols["label"]) if cols["label"] else None
            label = label if isinstance(label, int) else -1
        image_id = row.get(cols["image_id"]) if cols["image_id"] else None
        return Item(pos, load, captions, label, str(image_id if image_id is not None else row_no))
