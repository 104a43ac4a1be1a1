"""Shards from your own image-text data: a CSV/TSV file, an image folder, or a local HF dataset.

``build_shards`` reads one of three sources and writes WebDataset shards with dense dataset
indices and a ``manifest.json`` (see :mod:`data_pipelines.shards`). Samples that cannot be used
(missing or unreadable image, empty caption) are skipped and counted in the manifest's
``skipped``; the first few are named in a warning.

``csv``
    A CSV or TSV file with a header row. ``image_column`` holds an image path (relative paths are
    resolved against the CSV file's folder), ``caption_column`` the caption. The separator is
    ``separator`` or, by default, a tab for ``.tsv`` files and a comma otherwise; quoting follows
    Python's ``csv`` module (``"..."`` around fields that contain the separator). Several rows may
    name the same image (several captions per image): every sample's ``.json`` carries
    ``"image_id"``, the image path as written in the file, so evaluation can group them.

``imagefolder``
    A folder, searched recursively in sorted order, of images (.jpg/.jpeg/.png/.webp/.bmp), each
    with a caption in a sidecar text file of the same stem (``cat.jpg`` -> ``cat.txt``). An image
    without its ``.txt`` counts as an empty caption. Files and folders whose names start with
    ``.`` are ignored. ``image_column`` and ``caption_column`` are not used; a ``label_column`` of
    any value (e.g. ``--label-column folder``) labels every image with the name of its parent
    folder (``dogs/001.jpg`` -> ``dogs``).

``hf``
    A local Hugging Face dataset, read offline: a folder written by ``save_to_disk`` (a
    ``Dataset``, or a ``DatasetDict`` from which ``hf_split`` is taken), or a ``.parquet`` file or a
    folder of them. The image column may be an ``Image()`` feature (its original bytes and format
    are kept; formats other than JPEG/PNG/WebP/BMP are re-encoded as PNG), raw image bytes, or a
    path string (relative paths are resolved against the dataset's folder). The caption column
    holds a string, or a list of strings, which gives one sample per caption, all with the same
    ``"image_id"``.

Labels (optional, all sources; the rule is ``data_pipelines.labels``, shared with evaluation):
integer labels are used as they are, with label names
``"0" .. "max"``; text that is an integer in every row (``"3"``) counts as an integer. Other
string labels are numbered in sorted order of the distinct strings, which are the label names.
An HF ``ClassLabel`` column keeps its own names.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from .labels import label_map
from .offline import stay_offline
from .shards import IMAGE_EXTENSIONS, DataError, RawSample, ShardSet, SkippedInput, write_split

SOURCES = ("csv", "imagefolder", "hf")

log = logging.getLogger(__name__)

# PIL format name -> shard extension for the formats a shard may hold as they are
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}
# image modes PIL can write as PNG; others (CMYK, YCbCr, F, ...) are converted to RGB first
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}


_Item = RawSample | SkippedInput


def build_shards(
    source: str,
    input: str,
    out: str,
    *,
    shard_size: int = 1000,
    image_column: str = "image",
    caption_column: str = "caption",
    label_column: str | None = None,
    separator: str | None = None,
    hf_split: str = "train",
    progress: bool = True,
) -> ShardSet:
    """Write shards of ``shard_size`` samples into ``out`` from ``input``; return the ShardSet.

    Args:
        source: ``"csv"`` (CSV/TSV file), ``"imagefolder"`` (images with sidecar ``.txt``
            captions) or ``"hf"`` (``save_to_disk`` folder or parquet); see the module docstring.
        input: the file or folder to read.
        out: the folder to write; it must not hold shards already.
        image_column: csv/hf: the column with the image (a path, or image data for hf).
        caption_column: csv/hf: the column with the caption.
        label_column: the column with an integer or string label; for ``imagefolder`` any value
            (e.g. ``"folder"``) means: label every image with its parent folder's name.
        separator: csv: the field separator (one character; ``"\\t"`` or ``"tab"`` mean a tab).
            Default: a tab for ``.tsv`` files, else a comma.
        hf_split: hf: the split to take from a ``DatasetDict``.
        progress: show a tqdm progress bar.

    Raises:
        ValueError: ``source`` is not one of ``csv``, ``imagefolder``, ``hf``.
        DataError: ``input`` does not exist or is not of the expected kind, a named column is
            missing (the message lists the columns there are), a label is empty, or no usable
            sample was found.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}: choose one of {', '.join(SOURCES)}")
    path = Path(input)
    if not path.exists():
        raise DataError(f"input {input} does not exist")

    if source == "csv":
        items, total, label_names = _from_csv(
            path, image_column, caption_column, label_column, separator
        )
    elif source == "imagefolder":
        items, total, label_names = _from_imagefolder(path, label_column)
    else:
        items, total, label_names = _from_hf(
            path, image_column, caption_column, label_column, hf_split
        )
    return write_split(
        out,
        items,
        shard_size=shard_size,
        total=total,
        label_names=label_names,
        meta={"source": source, "input": os.path.abspath(input)},
        desc=f"{source} -> shards",
        progress=progress,
    )


def _read_image_file(path: Path, source: str) -> bytes | SkippedInput:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return SkippedInput("missing image file", source)
    except OSError as e:  # a folder, no permission, ...
        return SkippedInput(f"unreadable image file ({type(e).__name__}: {e})", source)


def _missing_column(column: str, kind: str, where: str, available: Iterable[str]) -> DataError:
    cols = ", ".join(repr(c) for c in available) or "none"
    return DataError(f"{where} has no {kind} column {column!r}; its columns are: {cols}")


# --- csv ----------------------------------------------------------------------------------------
def _delimiter(path: Path, separator: str | None) -> str:
    if separator is None:
        return "\t" if path.suffix.lower() == ".tsv" else ","
    if separator in ("\\t", "tab"):
        return "\t"
    if len(separator) != 1:
        raise DataError(f"separator must be one character (or '\\t'), got {separator!r}")
    return separator


def _from_csv(
    path: Path,
    image_column: str,
    caption_column: str,
    label_column: str | None,
    separator: str | None,
) -> tuple[Iterator[_Item], int, list[str] | None]:
    if not path.is_file():
        raise DataError(f"csv input {path} is not a file")
    delimiter = _delimiter(path, separator)
    rows: list[tuple[int, str, str, str | None]] = []  # line, image path, caption, label
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        header = reader.fieldnames or []
        wanted = [("image", image_column), ("caption", caption_column)]
        if label_column is not None:
            wanted.append(("label", label_column))
        for kind, column in wanted:
            if column not in header:
                raise _missing_column(column, kind, f"{path} (separator {delimiter!r})", header)
        for row in reader:
            label = None
            if label_column is not None:
                label = (row.get(label_column) or "").strip()
                if not label:
                    raise DataError(f"{path}:{reader.line_num}: empty label in {label_column!r}")
            image = (row.get(image_column) or "").strip()
            rows.append((reader.line_num, image, row.get(caption_column) or "", label))

    if label_column is not None:
        labels = label_map((r[3] for r in rows), f"{path} column {label_column!r}")
        to_int, label_names = labels.to_int, labels.names
    else:
        to_int, label_names = {}, None
    base = path.parent

    def items() -> Iterator[_Item]:
        for line, image, caption, label in rows:
            if not image:
                yield SkippedInput("no image path", f"{path.name}:{line}")
                continue
            image_path = base / image  # an absolute `image` replaces `base`
            source = f"{path.name}:{line} ({image_path})"
            data = _read_image_file(image_path, source)
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


# --- image folder -------------------------------------------------------------------------------
def _from_imagefolder(
    root: Path, label_column: str | None
) -> tuple[Iterator[_Item], int, list[str] | None]:
    if not root.is_dir():
        raise DataError(f"imagefolder input {root} is not a folder")
    images = sorted(
        (
            p.relative_to(root)
            for p in root.rglob("*")
            if p.suffix.lower().lstrip(".") in IMAGE_EXTENSIONS
            and not any(part.startswith(".") for part in p.relative_to(root).parts)
            and p.is_file()
        ),
        key=lambda rel: rel.as_posix(),
    )
    if not images:
        exts = "/".join("." + e for e in IMAGE_EXTENSIONS)
        raise DataError(f"no images ({exts}) found under {root}")

    def folder(rel: Path) -> str:
        return (root / rel).parent.name

    if label_column is not None:
        labels = label_map((folder(rel) for rel in images), f"{root} (labels from folder names)")
        to_int, label_names = labels.to_int, labels.names
    else:
        to_int, label_names = {}, None

    def items() -> Iterator[_Item]:
        for rel in images:
            image_path = root / rel
            sidecar = image_path.with_suffix(".txt")
            source = rel.as_posix()
            data = _read_image_file(image_path, source)
            if isinstance(data, SkippedInput):
                yield data
                continue
            try:
                caption = sidecar.read_bytes().decode("utf-8", errors="replace")
            except FileNotFoundError:
                caption, source = "", f"{source} (no caption file {sidecar.name})"
            yield RawSample(
                image=data,
                image_ext=image_path.suffix,
                caption=caption,
                label=to_int[folder(rel)] if label_column is not None else None,
                source=source,
                extra={"image_id": rel.as_posix()},
            )

    return items(), len(images), label_names


# --- Hugging Face -------------------------------------------------------------------------------
def _import_datasets() -> Any:
    """Import ``datasets`` set to work offline: only local data is read here."""
    stay_offline()
    import datasets

    return datasets


def _load_hf(path: Path, hf_split: str) -> tuple[Any, Path]:
    """Load a local HF dataset; return it and the folder relative image paths start from."""
    datasets = _import_datasets()

    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if hf_split not in ds:
                raise DataError(
                    f"{path} has no split {hf_split!r}; its splits are: {', '.join(ds)}"
                )
            ds = ds[hf_split]
        return ds, path
    if path.is_dir():
        files = sorted(path.rglob("*.parquet"), key=lambda p: p.relative_to(path).as_posix())
        if not files:
            raise DataError(
                f"{path} is neither a save_to_disk folder (no dataset_dict.json or state.json) "
                "nor a folder of .parquet files"
            )
        base = path
    elif path.suffix.lower() == ".parquet":
        files, base = [path], path.parent
    else:
        raise DataError(f"hf input {path} must be a save_to_disk folder or .parquet file(s)")
    ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    return ds, base


def _image_bytes(data: bytes) -> tuple[bytes, str]:
    """Keep JPEG/PNG/WebP/BMP bytes as they are; re-encode other formats as PNG."""
    try:
        with Image.open(io.BytesIO(data)) as im:
            ext = _KEEP_FORMATS.get(im.format or "")
            if ext is not None:
                return data, ext
            return _png_bytes(im), "png"
    except Exception:  # unreadable: the writer checks it again, skips and counts it
        return data, "png"


def _png_bytes(im: Image.Image) -> bytes:
    if im.mode not in _PNG_MODES:
        im = im.convert("RGBA" if "A" in im.getbands() else "RGB")
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def _hf_image(value: Any, base: Path, column: str, source: str) -> tuple[bytes, str] | SkippedInput:
    if isinstance(value, Image.Image):
        return _png_bytes(value), "png"
    if isinstance(value, dict):  # datasets.Image(decode=False): {"bytes": ..., "path": ...}
        if value.get("bytes"):
            return _image_bytes(value["bytes"])
        if value.get("path"):
            value = value["path"]
        else:
            return SkippedInput("no image", source)
    if isinstance(value, (bytes, bytearray)):
        return _image_bytes(bytes(value))
    if isinstance(value, str):
        data = _read_image_file(base / value, f"{source} ({base / value})")
        return data if isinstance(data, SkippedInput) else _image_bytes(data)
    if value is None:
        return SkippedInput("no image", source)
    raise DataError(
        f"{source}: column {column!r} holds a {type(value).__name__}; expected an Image() "
        "feature, image bytes or a path"
    )


def _from_hf(
    path: Path,
    image_column: str,
    caption_column: str,
    label_column: str | None,
    hf_split: str,
) -> tuple[Iterator[_Item], int | None, list[str] | None]:
    datasets = _import_datasets()
    ds, base = _load_hf(path, hf_split)
    wanted = [("image", image_column), ("caption", caption_column)]
    if label_column is not None:
        wanted.append(("label", label_column))
    for kind, column in wanted:
        if column not in ds.column_names:
            raise _missing_column(column, kind, f"HF dataset {path}", ds.column_names)
    ds = ds.select_columns([c for _, c in wanted])
    if isinstance(ds.features[image_column], datasets.Image):
        ds = ds.cast_column(image_column, datasets.Image(decode=False))  # keep original bytes

    to_int: dict[Any, int] = {}
    label_names: list[str] | None = None
    if label_column is not None:
        distinct = ds.unique(label_column)
        if None in distinct:
            row = next(i for i, v in enumerate(ds[label_column]) if v is None)
            raise DataError(f"HF dataset {path}: row {row} has no label in {label_column!r}")
        feature = ds.features[label_column]
        if isinstance(feature, datasets.ClassLabel):
            to_int, label_names = {v: int(v) for v in distinct}, list(feature.names)
        else:
            labels = label_map(distinct, f"HF dataset {path} column {label_column!r}")
            to_int, label_names = labels.to_int, labels.names

    one_caption = isinstance(ds.features[caption_column], datasets.Value)

    def items() -> Iterator[_Item]:
        for i, row in enumerate(ds):
            source = f"{path.name} row {i}"
            value = row[image_column]
            image = _hf_image(value, base, image_column, source)
            if isinstance(image, SkippedInput):
                yield image
                continue
            captions = row[caption_column]
            if captions is None or isinstance(captions, str):
                captions = [captions or ""]
            elif not isinstance(captions, list):
                raise DataError(
                    f"{source}: column {caption_column!r} holds a {type(captions).__name__}; "
                    "expected a string or a list of strings"
                )
            image_id = value if isinstance(value, str) else f"row {i}"
            label = None if label_column is None else to_int[row[label_column]]
            for caption in captions:
                yield RawSample(
                    image=image[0],
                    image_ext=image[1],
                    caption=caption if isinstance(caption, str) else "",
                    label=label,
                    source=source,
                    extra={"image_id": image_id},
                )

    return items(), len(ds) if one_caption else None, label_names
