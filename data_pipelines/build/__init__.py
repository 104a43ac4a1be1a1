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

    Splits: ``hf_split`` is taken from a ``DatasetDict``, or from a folder of parquet files by
    their names (the Hub's ``data/train-00000-of-00001.parquet``, ``data/test-...``, or flat
    ``train.parquet`` and ``test.parquet``; the rule is ``data_pipelines.splits``, shared with
    evaluation). A split the data lacks is refused, naming the splits it has. Data that offers
    no choice of split (a saved ``Dataset``, a single ``.parquet`` file, a folder whose parquet
    file names carry no split) is read whole; when ``hf_split`` is not the default ``train``
    (nor the split the data names itself), a warning says it selected nothing.

Labels (optional, all sources; the rule is ``data_pipelines.labels``, shared with evaluation):
integer labels are used as they are, with label names
``"0" .. "max"``; text that is an integer in every row (``"3"``) counts as an integer. Other
string labels are numbered in sorted order of the distinct strings, which are the label names.
An HF ``ClassLabel`` column keeps its own names.
"""

from __future__ import annotations

import os
from pathlib import Path

from ..shards import DataError, ShardSet, write_split
from .from_csv import read_csv
from .from_hf import DEFAULT_SPLIT, read_hf
from .from_imagefolder import read_imagefolder

SOURCES = ("csv", "imagefolder", "hf")


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
    hf_split: str = DEFAULT_SPLIT,
    progress: bool = True,
    images_only: bool = False,
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
        hf_split: hf: the split to take from a ``DatasetDict`` or a folder of parquet files
            named by split (see the module docstring).
        progress: show a tqdm progress bar.
        images_only: vision-only data: captions are neither needed nor read (no caption column
            for csv/hf, no sidecar ``.txt`` for imagefolder); the shards hold images, indices
            and labels.

    Raises:
        ValueError: ``source`` is not one of ``csv``, ``imagefolder``, ``hf``.
        DataError: ``input`` does not exist or is not of the expected kind, a named column is
            missing (the message lists the columns there are), ``hf_split`` is not among the
            data's splits (the message lists them), a label is empty, or no usable sample was
            found.
    """
    if source not in SOURCES:
        raise ValueError(f"unknown data source {source!r}: choose one of {', '.join(SOURCES)}")
    path = Path(input)
    if not path.exists():
        raise DataError(f"input {input} does not exist")

    captions = None if images_only else caption_column
    if source == "csv":
        items, total, label_names = read_csv(path, image_column, captions, label_column, separator)
    elif source == "imagefolder":
        items, total, label_names = read_imagefolder(path, label_column, images_only=images_only)
    else:
        items, total, label_names = read_hf(path, image_column, captions, label_column, hf_split)
    return write_split(
        out,
        items,
        shard_size=shard_size,
        total=total,
        label_names=label_names,
        meta={
            "source": source,
            "input": os.path.abspath(input),
            **({"images_only": True} if images_only else {}),
        },
        desc=f"{source} -> shards",
        progress=progress,
        images_only=images_only,
    )
