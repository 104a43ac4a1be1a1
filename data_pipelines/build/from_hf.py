"""``clipfnd data build --from hf``: a local Hugging Face dataset (``save_to_disk`` folder or
parquet), read offline; images kept as their original bytes where a shard can hold them."""

from __future__ import annotations

import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from PIL import Image

from ..labels import label_map
from ..offline import stay_offline
from ..shards import DataError, RawSample, SkippedInput
from ..splits import choose_split, parquet_splits, split_of
from .common import Item, missing_column, read_image_file

DEFAULT_SPLIT = "train"  # build_shards' and the command line's default hf_split
# PIL format name -> shard extension for the formats a shard may hold as they are
_KEEP_FORMATS = {"JPEG": "jpg", "PNG": "png", "WEBP": "webp", "BMP": "bmp"}
# image modes PIL can write as PNG; others (CMYK, YCbCr, F, ...) are converted to RGB first
_PNG_MODES = {"1", "L", "LA", "I", "I;16", "P", "RGB", "RGBA"}

log = logging.getLogger(__name__)


def _import_datasets() -> Any:
    """Import ``datasets`` set to work offline: only local data is read here."""
    stay_offline()
    import datasets

    return datasets


def _load_hf(path: Path, hf_split: str) -> tuple[Any, Path]:
    """Load ``hf_split`` of a local HF dataset; return it and the folder relative image paths
    start from. Data that offers no choice of split is read whole (see the package docstring)."""
    datasets = _import_datasets()

    if path.is_dir() and ((path / "dataset_dict.json").exists() or (path / "state.json").exists()):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            return ds[choose_split(list(ds), hf_split, hf_split, str(path), "--hf-split")], path
        split = str(ds.split) if ds.split is not None else None
        _read_whole(path, "a saved Dataset, not a DatasetDict of splits", split, hf_split)
        return ds, path
    if path.is_dir():
        by_split = parquet_splits(path)
        if not by_split:
            raise DataError(
                f"{path} is neither a save_to_disk folder (no dataset_dict.json or state.json) "
                "nor a folder of .parquet files"
            )
        if list(by_split) == [""]:
            files = by_split[""]
            what = f"the names of its {len(files)} .parquet file(s) carry no split"
            _read_whole(path, what, None, hf_split)
        else:
            split = choose_split(sorted(by_split), hf_split, hf_split, str(path), "--hf-split")
            files = by_split[split]
        base = path
    elif path.suffix.lower() == ".parquet":
        files, base = [path], path.parent
        _read_whole(path, "a single .parquet file", split_of(path), hf_split)
    else:
        raise DataError(f"hf input {path} must be a save_to_disk folder or .parquet file(s)")
    ds = datasets.load_dataset("parquet", data_files=[str(f) for f in files], split="train")
    return ds, base


def _read_whole(path: Path, what: str, split: str | None, hf_split: str) -> None:
    """Say that ``hf_split`` selects nothing in data without a choice of split, unless it is
    the default or the split the data says it is."""
    if hf_split != DEFAULT_SPLIT and split != hf_split:
        log.warning("%s: %s; read whole (--hf-split %s selects nothing here)", path, what, hf_split)


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
        data = read_image_file(base / value, f"{source} ({base / value})")
        return data if isinstance(data, SkippedInput) else _image_bytes(data)
    if value is None:
        return SkippedInput("no image", source)
    raise DataError(
        f"{source}: column {column!r} holds a {type(value).__name__}; expected an Image() "
        "feature, image bytes or a path"
    )


def read_hf(
    path: Path,
    image_column: str,
    caption_column: str | None,
    label_column: str | None,
    hf_split: str,
) -> tuple[Iterator[Item], int | None, list[str] | None]:
    """``caption_column`` None: image-only data (no caption read)."""
    datasets = _import_datasets()
    ds, base = _load_hf(path, hf_split)
    wanted = [("image", image_column)]
    if caption_column is not None:
        wanted.append(("caption", caption_column))
    if label_column is not None:
        wanted.append(("label", label_column))
    for kind, column in wanted:
        if column not in ds.column_names:
            raise missing_column(column, kind, f"HF dataset {path}", ds.column_names)
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

    one_caption = caption_column is None or isinstance(ds.features[caption_column], datasets.Value)

    def items() -> Iterator[Item]:
        for i, row in enumerate(ds):
            source = f"{path.name} row {i}"
            value = row[image_column]
            image = _hf_image(value, base, image_column, source)
            if isinstance(image, SkippedInput):
                yield image
                continue
            captions = row[caption_column] if caption_column is not None else ""
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
