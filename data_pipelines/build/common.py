"""What the three sources of ``clipfnd data build`` share: reading an image file, naming a
missing column, and the type of what a source yields."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from ..shards import DataError, RawSample, SkippedInput

Item = RawSample | SkippedInput


def read_image_file(path: Path, source: str) -> bytes | SkippedInput:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        return SkippedInput("missing image file", source)
    except OSError as e:  # a folder, no permission, ...
        return SkippedInput(f"unreadable image file ({type(e).__name__}: {e})", source)


def missing_column(column: str, kind: str, where: str, available: Iterable[str]) -> DataError:
    cols = ", ".join(repr(c) for c in available) or "none"
    return DataError(f"{where} has no {kind} column {column!r}; its columns are: {cols}")
