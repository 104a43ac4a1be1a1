"""Which layout a ``--data`` path has, and the dataset that reads it (``open_dataset``).

The layouts themselves are in ``tar_layouts`` (clipfnd shards, clip_benchmark WebDataset) and
``table_layouts`` (CSV/TSV, Hugging Face datasets); what they share is in ``datasets``. This
module imports them all and nothing imports it back, so the imports flow one way.
"""

from __future__ import annotations

import os
from pathlib import Path

from data_pipelines import DataError
from data_pipelines.splits import find_parquet

from .datasets import EvalDataset
from .table_layouts import CsvTable, HFTable, is_saved_hf_dataset
from .tar_layouts import ClipBenchmarkWds, ClipfndShards, is_clip_benchmark_root


def open_dataset(
    path: str | os.PathLike,
    *,
    split: str | None = None,
    default_split: str = "test",
    image_column: str | None = None,
    caption_column: str | None = None,
    label_column: str | None = None,
) -> EvalDataset:
    """Open ``path`` in whichever layout it has (see the module docstring)."""
    columns = {
        "image_column": image_column,
        "caption_column": caption_column,
        "label_column": label_column,
    }
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"no dataset at {p}")
    if p.is_file():
        if p.name == "manifest.json" or p.suffix.lower() == ".json":  # data index writes any name
            return ClipfndShards(p)
        if p.suffix.lower() in (".csv", ".tsv"):
            return CsvTable(p, **columns)
        if p.suffix.lower() == ".parquet":
            return HFTable.from_parquet([p], p, split=split, **columns)
        raise DataError(
            f"{p}: not a dataset file (expected .csv, .tsv, .parquet or a manifest .json)"
        )
    if (p / "manifest.json").is_file():
        return ClipfndShards(p)
    if is_clip_benchmark_root(p, split or default_split):
        return ClipBenchmarkWds(p, split or default_split)
    if (p / "nshards.txt").is_file():  # pointed at ROOT/{split} itself
        return ClipBenchmarkWds(p.parent, p.name)
    if is_saved_hf_dataset(p):
        return HFTable.from_disk(p, split=split, default_split=default_split, **columns)
    parquet = find_parquet(p, split, default_split)
    if parquet:
        return HFTable.from_parquet(parquet, p, split=split, **columns)
    raise DataError(
        f"{p}: no known dataset layout. Expected one of: a clipfnd shard folder (manifest.json); "
        f"a clip_benchmark WebDataset root ({split or default_split}/nshards.txt, "
        f"{split or default_split}/0.tar, classnames.txt); a CSV/TSV file; a Hugging Face "
        "dataset saved with save_to_disk; parquet file(s)"
    )
