"""``clipfnd data build --from csv``: a CSV/TSV table of image paths with captions (and labels)."""

from __future__ import annotations

import csv
from collections.abc import Iterator
from pathlib import Path

from ..labels import label_map
from ..shards import DataError, RawSample, SkippedInput
from .common import Item, missing_column, read_image_file


def _delimiter(path: Path, separator: str | None) -> str:
    if separator is None:
        return "\t" if path.suffix.lower() == ".tsv" else ","
    if separator in ("\\t", "tab"):
        return "\t"
    if len(separator) != 1:
        raise DataError(f"separator must be one character (or '\\t'), got {separator!r}")
    return separator


def _utf8(text: str) -> bool:
    """False when ``text`` holds bytes that were not UTF-8 (decoded as surrogates)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def read_csv(
    path: Path,
    image_column: str,
    caption_column: str | None,
    label_column: str | None,
    separator: str | None,
) -> tuple[Iterator[Item], int, list[str] | None]:
    """``caption_column`` None: image-only data (no caption read)."""
    if not path.is_file():
        raise DataError(f"csv input {path} is not a file")
    delimiter = _delimiter(path, separator)
    rows: list[tuple[int, str, str, str | None]] = []  # line, image path, caption, label
    # undecodable bytes become surrogates, so the row holding them is skipped and named
    # (not the whole file refused at the first one)
    with open(path, newline="", encoding="utf-8-sig", errors="surrogateescape") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames or []
        wanted = [("image", image_column)]
        if caption_column is not None:
            wanted.append(("caption", caption_column))
        if label_column is not None:
            wanted.append(("label", label_column))
        for kind, column in wanted:
            if column not in header:
                raise missing_column(column, kind, f"{path} (separator {delimiter!r})", header)
        for row in reader:
            label = None
            if label_column is not None:
                label = (row.get(label_column) or "").strip()
                if not label:
                    raise DataError(f"{path}:{reader.line_num}: empty label in {label_column!r}")
            image = (row.get(image_column) or "").strip()
            caption = (row.get(caption_column) or "") if caption_column else ""
            if not _utf8(image) or (label is not None and not _utf8(label)):
                raise DataError(
                    f"{path}:{reader.line_num}: the image path or label is not UTF-8 text"
                )
            rows.append((reader.line_num, image, caption, label))

    if label_column is not None:
        labels = label_map((r[3] for r in rows), f"{path} column {label_column!r}")
        to_int, label_names = labels.to_int, labels.names
    else:
        to_int, label_names = {}, None
    base = path.parent

    def items() -> Iterator[Item]:
        for line, image, caption, label in rows:
            if not _utf8(caption):
                yield SkippedInput("caption not UTF-8", f"{path.name}:{line}")
                continue
            if not image:
                yield SkippedInput("no image path", f"{path.name}:{line}")
                continue
            image_path = base / image  # an absolute `image` replaces `base`
            source = f"{path.name}:{line} ({image_path})"
            data = read_image_file(image_path, source)
            if isinstance(data, SkippedInput):
                yield data
                continue
            yield RawSample(
                image=data,
                image_ext=image_path.suffix,
                caption=caption,
                label=None if label is None else to_int[label],
                source=source,
                extra={"image_id": image},
            )

    return items(), len(rows), label_names
