"""``clipfnd data verify DIR``: check a split against its manifest, reading tar headers and
the small ``.json`` and ``.txt`` members (no image is decoded).

For every shard: the sample count against the manifest's, samples without an image, captions
that are not UTF-8 (the loader skips them; not checked for images-only data), and each
sample's dataset index (present, an integer, inside ``[0, N)``, unique over the split, and
all of ``[0, N)`` covered); labels inside the manifest's label names. Returns a report and
lists every problem, naming the shard and sample.
"""

from __future__ import annotations

import json
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

from .progress import bar_disable
from .shards import (
    IMAGE_EXTENSIONS,
    DataError,
    ShardSet,
    caption_not_utf8,
    iter_tar_samples,
    load_shard_set,
)


@dataclass
class VerifyReport:
    root: str
    shards: int = 0
    samples: int = 0
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def verify_split(path: str | Path, max_problems: int = 50, progress: bool = True) -> VerifyReport:
    from tqdm.auto import tqdm

    shard_set = load_shard_set(path)  # refuses a malformed manifest or a missing shard
    if shard_set.in_place:
        return _verify_in_place(shard_set, max_problems, progress)
    n = shard_set.num_samples
    labels = len(shard_set.label_names or [])
    captions = _with_captions(shard_set)
    report = VerifyReport(shard_set.root, shards=shard_set.num_shards)
    seen: dict[int, str] = {}

    def problem(text: str) -> None:
        if len(report.problems) < max_problems:
            report.problems.append(text)

    for shard in tqdm(shard_set.shards, desc="verify", unit="shard", disable=bar_disable(progress)):
        count = 0
        try:
            for s in iter_tar_samples(shard.path, shard, shard_set.manifest):
                count += 1
                key = s.get("__key__", "?")
                where = f"{shard.path} sample {key}"
                if not any(e in s for e in IMAGE_EXTENSIONS):
                    problem(f"{where}: no image")
                if captions and (bad := _caption_problem(s)):
                    problem(f"{where}: {bad}")
                try:
                    meta = json.loads(s["json"]) if "json" in s else {}
                except (json.JSONDecodeError, UnicodeDecodeError):
                    problem(f"{where}: unreadable .json")
                    continue
                index = meta.get("index") if isinstance(meta, dict) else None
                if not isinstance(index, int) or not 0 <= index < n:
                    problem(f"{where}: dataset index {index!r} outside [0, {n})")
                elif index in seen:
                    problem(f"{where}: dataset index {index} again (first in {seen[index]})")
                else:
                    seen[index] = shard.path
                label = meta.get("label", -1) if isinstance(meta, dict) else -1
                if labels and isinstance(label, int) and label >= labels:
                    problem(f"{where}: label {label} outside the {labels} label names")
        except (OSError, EOFError, ValueError, tarfile.TarError) as e:
            problem(f"{shard.path}: unreadable after {count} samples ({type(e).__name__}: {e})")
        if count != shard.num_samples:
            problem(
                f"{shard.path}: manifest says {shard.num_samples} samples, the shard holds {count}"
            )
        report.samples += count
    if len(seen) != n:
        problem(f"{len(seen)} distinct dataset indices for the manifest's {n} samples")
    return report


def _verify_in_place(shard_set: ShardSet, max_problems: int, progress: bool) -> VerifyReport:
    """Shards indexed in place: read each shard the way the loader does (webdataset's tar
    reader, ``ShardSet.unusable``) and compare its counts with the manifest's."""
    from tqdm.auto import tqdm

    report = VerifyReport(shard_set.root, shards=shard_set.num_shards)
    captions = _with_captions(shard_set)

    def problem(text: str) -> None:
        if len(report.problems) < max_problems:
            report.problems.append(text)

    for shard in tqdm(shard_set.shards, desc="verify", unit="shard", disable=bar_disable(progress)):
        raw = usable = 0
        try:
            for s in iter_tar_samples(shard.path, shard, shard_set.manifest):
                raw += 1
                if shard_set.unusable(s) is not None:
                    continue
                usable += 1
                if captions and (bad := _caption_problem(s)):
                    problem(f"{shard.path} sample {s['__key__']}: {bad}")
        except (OSError, EOFError, ValueError, tarfile.TarError) as e:
            problem(f"{shard.path}: unreadable after {raw} samples ({e})")
            continue
        if (raw, usable) != (shard.num_raw, shard.num_samples):
            problem(
                f"{shard.path}: manifest says {shard.num_samples} usable of {shard.num_raw} "
                f"samples, the shard holds {usable} of {raw}"
            )
        report.samples += usable
    return report


def _with_captions(shard_set: ShardSet) -> bool:
    """Whether the split's captions are read for training (not for images-only data)."""
    return not (shard_set.images_only or shard_set.meta.get("images_only"))


def _caption_problem(sample: dict) -> str | None:
    """Why the loader would skip the sample's caption, or None."""
    try:
        sample.get("txt", b"").decode("utf-8")
    except UnicodeDecodeError as e:
        return caption_not_utf8(e)
    return None


__all__ = ["DataError", "VerifyReport", "verify_split"]
