"""Which split a parquet file holds, from its name: the one rule of ``clipfnd data build --from
hf`` and of evaluation (``eval.table_layouts``).

The Hugging Face Hub stores a dataset's parquet files as ``data/train-00000-of-00001.parquet``
and ``data/test-00000-of-00001.parquet``, or as ``train/0000.parquet``; a flat folder may hold
``train.parquet`` and ``test.parquet``. A file's split is read from the name of its folder (when
that folder lies inside the one given, whose own name is the user's choice) or else from its
own name: ``train``, ``test``, ``validation``, ``valid`` or ``val``, followed by ``-``, ``_``,
``.`` or the end of the name. Files whose names carry no split are one unnamed group (``""``);
a folder that mixes both is refused, since the unnamed files belong to no split.
"""

from __future__ import annotations

import re
from pathlib import Path

from .errors import DataError

SPLIT_NAME = re.compile(r"(train|test|validation|valid|val)(?:[-_.]|$)")
# the split evaluation takes when several are there and none was asked for
SPLIT_PREFERENCE = ("test", "validation", "val", "valid")


def split_of(file: Path, root: Path | None = None) -> str | None:
    """The split ``file`` belongs to by its folder's name (a folder inside ``root`` only) or
    its own name; None when neither names one."""
    names = [file.name]
    if root is not None and file.parent != root and file.parent.is_relative_to(root):
        names.insert(0, file.parent.name)
    for name in names:
        m = SPLIT_NAME.match(name)
        if m:
            return m.group(1)
    return None


def parquet_splits(root: Path) -> dict[str, list[Path]]:
    """The ``.parquet`` files under ``root`` (searched recursively, in order of their paths
    below ``root``) by split; ``""`` holds the files whose names carry none.

    Raises:
        DataError: some files carry a split name and others none.
    """
    files = sorted(root.rglob("*.parquet"), key=lambda p: p.relative_to(root).as_posix())
    by_split: dict[str, list[Path]] = {}
    for f in files:
        by_split.setdefault(split_of(f, root) or "", []).append(f)
    if "" in by_split and len(by_split) > 1:
        named = ", ".join(sorted(s for s in by_split if s))
        raise DataError(
            f"{root}: some .parquet files carry a split name ({named}) and others none (e.g. "
            f"{by_split[''][0].relative_to(root)}), which belong to no split; move them out or "
            "point at the files of one split"
        )
    return by_split


def choose_split(
    splits: list[str], split: str | None, default: str, where: str, option: str = "--split"
) -> str:
    """The split to read among ``splits``: ``split`` if given (refused if missing), else the
    only one, else ``default`` or the first of ``SPLIT_PREFERENCE`` there is."""
    if split is not None:
        if split not in splits:
            raise DataError(
                f"{where} has no split {split!r}; its splits are: {', '.join(splits)} "
                f"(choose one with {option})"
            )
        return split
    if len(splits) == 1:
        return splits[0]
    for name in (default, *SPLIT_PREFERENCE):
        if name in splits:
            return name
    raise DataError(f"{where} has several splits ({', '.join(splits)}); choose one with {option}")


def find_parquet(root: Path, split: str | None, default_split: str) -> list[Path]:
    """The parquet files of one split under ``root`` (all of them when no name carries a
    split; none when there is no parquet file)."""
    by_split = parquet_splits(root)
    if not by_split:
        return []
    if list(by_split) == [""]:
        return by_split[""]
    return by_split[choose_split(sorted(by_split), split, default_split, str(root))]
