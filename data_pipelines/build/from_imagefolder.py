"""``clipfnd data build --from imagefolder``: images under a folder, captions in ``.txt``
files beside them, labels from the parent folder's name."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from ..labels import label_map
from ..shards import IMAGE_EXTENSIONS, DataError, RawSample, SkippedInput
from .common import Item, read_image_file


def read_imagefolder(
    root: Path, label_column: str | None, *, images_only: bool = False
) -> tuple[Iterator[Item], int, list[str] | None]:
    """``images_only``: no sidecar captions are read (vision-only data)."""
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

    def items() -> Iterator[Item]:
        for rel in images:
            image_path = root / rel
            sidecar = image_path.with_suffix(".txt")
            source = rel.as_posix()
            data = read_image_file(image_path, source)
            if isinstance(data, SkippedInput):
                yield data
                continue
            caption = ""
            if not images_only:
                try:
                    caption = sidecar.read_bytes().decode("utf-8")
                except FileNotFoundError:
                    source = f"{source} (no caption file {sidecar.name})"
                except UnicodeDecodeError:  # the same rule as CSV captions: skip and count
                    yield SkippedInput("caption not UTF-8", f"{source} ({sidecar.name})")
                    continue
            yield RawSample(
                image=data,
                image_ext=image_path.suffix,
                caption=caption,
                label=to_int[folder(rel)] if label_column is not None else None,
                source=source,
                extra={"image_id": rel.as_posix()},
            )

    return items(), len(images), label_names
