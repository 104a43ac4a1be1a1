"""``clipfnd data index``: a manifest for WebDataset shards as they are, so nothing is rewritten.

img2dataset's output (or any WebDataset shards: ``KEY.jpg``, ``KEY.txt``, ``KEY.json``) has
no dense dataset index, but per-sample state only needs one, and it follows from the order
of the shards and each sample's position among its shard's usable samples::

    index = shard offset + position among the shard's usable samples

This module reads every shard's tar headers (and the small ``.txt``/``.json`` members; no
image is read or decoded), counts usable samples with the rule the loader applies
(``shards.unusable_reason``), and writes a manifest: each shard's path, size and mtime (a
shard that changes afterwards is refused by the loader), sample counts, offset, the member
kinds it found and what it skipped. img2dataset's ``*_stats.json`` / ``*.parquet`` are read
only to cross-check the counts.

Sources are folders (their ``*.tar``), files, or brace patterns (``cc3m/{00000..00331}.tar``);
several at once as arguments or joined by ``::`` (as open_clip's ``--train-data``), each with
an optional upsampling factor used under ``data.resampled``.
"""

from __future__ import annotations

import json
import math
import multiprocessing
import os
import tarfile
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import webdataset as wds

from .labels import label_map
from .progress import bar_disable
from .shards import (
    FORMAT_NAME,
    IMAGE_EXTENSIONS,
    USABLE_RULE,
    DataError,
    unusable_reason,
)
from .tars import HeaderFingerprint, is_sample_member
from .urls import is_remote, public, redact

FORMAT_VERSION_IN_PLACE = 2
# members read whole (small); every other member is only sized from its header
TEXT_EXTENSIONS = ("txt", "json")


@dataclass
class ShardScan:
    """What one shard holds, from its headers and small members."""

    path: str
    size: int | None
    mtime_ns: int | None
    num_raw: int = 0
    num_samples: int = 0
    keys: Counter = field(default_factory=Counter)
    skipped: Counter = field(default_factory=Counter)
    labels: Counter = field(default_factory=Counter)  # the label field's values, counted
    unlabelled: int = 0
    label_error: str | None = None
    cross_check: str | None = None  # a disagreement with img2dataset's own counts
    error: str | None = None
    etag: str | None = None  # a remote shard's, where the store gives one
    fingerprint: str | None = None  # its member headers' (tars.HeaderFingerprint)
    fingerprint_chunks: list[str] | None = None  # per 16 MiB of the shard (remote shards)


def _split_sources(arg: str) -> list[str]:
    """The ``::``-joined parts of one argument (open_clip's ``--train-data`` syntax)."""
    return [part.strip() for part in arg.split("::") if part.strip()]


def expand_sources(sources: list[str]) -> list[list[Path | str]]:
    """Each source (arguments, and ``::``-joined parts) as its ordered list of shard files
    (remote ones as URLs: ``data_pipelines.remote.expand_remote``)."""
    from braceexpand import braceexpand

    out: list[list[Path | str]] = []
    for arg in sources:
        for spec in _split_sources(arg):
            if is_remote(spec):
                from .remote import check_source, expand_remote

                check_source(spec)
                out.append(list(expand_remote(spec)))
                continue
            files: list[Path | str] = []
            for item in braceexpand(spec):
                p = Path(item).expanduser()
                if p.is_dir():  # hidden files (macOS's ._00000.tar, say) are not shards
                    found = sorted(f for f in p.glob("*.tar") if not f.name.startswith("."))
                    if not found:
                        raise DataError(f"{p} holds no .tar shards")
                    files += found
                elif p.is_file():
                    files.append(p)
                else:
                    raise DataError(f"source {spec!r}: {p} is neither a shard nor a folder")
            out.append(files)
    if not out:
        raise DataError("no source given: name shard folders, files or brace patterns")
    return out


def _members(
    tar: tarfile.TarFile, url: str, fingerprint: HeaderFingerprint
) -> Iterator[dict[str, Any]]:
    """Members as webdataset's tar reader yields them (same filters), with the bytes of text
    members and only the size of the others; every header goes into ``fingerprint``."""
    for info in tar:
        fingerprint.add(info)
        if not is_sample_member(info):
            continue
        _, ext = wds.tariterators.base_plus_ext(info.name)
        if ext is not None and ext.lower() in TEXT_EXTENSIONS:
            data: Any = tar.extractfile(info).read()
        else:
            data = info.size
        yield {"fname": info.name, "data": data, "__url__": url}
        tar.members = []  # headers are not kept: a shard of any size in constant memory


def scan_shard(path: str, images_only: bool, label_field: str | None) -> ShardScan:
    """Count one shard's samples (grouped by key exactly as webdataset groups them). A remote
    shard (``data_pipelines.remote``) is streamed once (retried from its start after a
    transient failure); its size and ETag are recorded."""
    if is_remote(path):
        return _scan_remote(path, images_only, label_field)
    scan = ShardScan(path, 0, 0)
    try:
        st = os.stat(path)
        scan.size, scan.mtime_ns = st.st_size, st.st_mtime_ns
        with tarfile.open(path, mode="r:") as tar:
            with_image = _count(scan, tar, path, images_only, label_field)
            end = tar.offset  # where tarfile stopped reading headers
        with open(path, "rb") as f:  # past the end marker only zero padding may follow
            f.seek(end)
            tail = f.read(1 << 20)
        if tail.strip(b"\0"):
            raise tarfile.ReadError(
                f"no valid tar header at byte {end} of {scan.size} (corrupt or not a tar)"
            )
    except (OSError, EOFError, ValueError, tarfile.TarError) as e:
        scan.error = f"{type(e).__name__}: {e}"
        return scan
    try:
        scan.cross_check = _cross_check(Path(path), with_image)
    except Exception as e:  # their files are only a cross-check: never a reason to stop
        scan.cross_check = f"could not read img2dataset's counts: {type(e).__name__}: {e}"
    return scan


def _count(
    scan: ShardScan, tar: tarfile.TarFile, path: str, images_only: bool, label_field: str | None
) -> int:
    """Count the samples of an open tar into ``scan``; returns how many have an image."""
    with_image = 0
    fingerprint = HeaderFingerprint()
    for s in wds.tariterators.group_by_keys(_members(tar, path, fingerprint)):
        scan.num_raw += 1
        for k in s:
            if not k.startswith("__"):
                scan.keys[k] += 1
        ext = next((e for e in IMAGE_EXTENSIONS if e in s), None)
        size = s[ext] if ext else None
        reason = unusable_reason(size, s.get("txt"), s.get("json"), images_only=images_only)
        with_image += ext is not None
        if reason is not None:
            scan.skipped[reason.split(" (")[0]] += 1
            continue
        scan.num_samples += 1
        if label_field is not None:
            meta = json.loads(s["json"]) if "json" in s else {}
            value = meta.get(label_field)  # a usable sample's .json is a dict
            if value is None or value == "":
                scan.unlabelled += 1
            elif isinstance(value, (int, str)) and not isinstance(value, bool):
                scan.labels[value] += 1
            elif scan.label_error is None:
                scan.label_error = (
                    f"{path} sample {s['__key__']}: .json field {label_field!r} holds "
                    f"{json.dumps(value)[:60]}; labels must be integers or strings"
                )
    scan.fingerprint = fingerprint.hexdigest()
    scan.fingerprint_chunks = fingerprint.finish()
    return with_image


class _Tail:
    """A stream that counts the bytes read and keeps the last ``keep`` of them."""

    def __init__(self, stream, keep: int = 1 << 21):
        self.stream, self.keep, self.read_bytes, self.tail = stream, keep, 0, bytearray()

    def read(self, n: int = -1) -> bytes:
        data = self.stream.read(n)
        self.read_bytes += len(data)
        self.tail += data
        del self.tail[: max(0, len(self.tail) - self.keep)]
        return data


def _scan_remote(url: str, images_only: bool, label_field: str | None) -> ShardScan:
    """``scan_shard`` of a remote shard: streamed once (headers and the small members kept),
    the whole scan retried after a transient failure."""
    from .remote import describe, open_remote, remote_info, with_retries

    def attempt() -> ShardScan:
        scan = ShardScan(public(url), 0, 0)
        info = remote_info(url)
        scan.size, scan.etag = info.size, info.etag
        stream = open_remote(url)
        try:
            counted = _Tail(stream)
            with tarfile.open(fileobj=counted, mode="r|") as tar:
                _count(scan, tar, url, images_only, label_field)
                end = tar.offset
            while counted.read(1 << 20):  # to the end: only zero padding may follow
                pass
        finally:
            stream.close()
        if scan.size is not None and counted.read_bytes != scan.size:
            raise EOFError(f"read {counted.read_bytes} of its {scan.size} bytes")
        after = counted.read_bytes - end
        if after > len(counted.tail) or bytes(counted.tail[len(counted.tail) - after :]).strip(
            b"\0"
        ):
            raise tarfile.ReadError(f"no valid tar header at byte {end} (corrupt or not a tar)")
        return scan

    try:
        return with_retries("indexing shard", url, attempt)
    except Exception as e:  # any failure of the store's client: said in words, no credential
        scan = ShardScan(public(url), 0, 0)
        scan.error = describe(e, url)
        return scan


def _cross_check(path: Path, with_image: int) -> str | None:
    """Compare with img2dataset's count of successes for this shard, when it left one."""
    stats = path.with_name(path.stem + "_stats.json")
    parquet = path.with_suffix(".parquet")
    theirs, where = None, None
    try:
        if stats.is_file():
            stats_json = json.loads(stats.read_text())
            theirs = stats_json.get("successes") if isinstance(stats_json, dict) else None
            where = stats.name
        elif parquet.is_file():
            import pyarrow.parquet as pq

            status = pq.read_table(parquet, columns=["status"]).column("status").to_pylist()
            theirs, where = sum(s == "success" for s in status), parquet.name
    except (OSError, ValueError, KeyError, ImportError) as e:
        return f"could not read img2dataset's counts: {type(e).__name__}: {e}"
    if isinstance(theirs, int) and theirs != with_image:
        return (
            f"{where} says {theirs} successes, the shard holds {with_image} samples with an image"
        )
    return None


def _scan(args: tuple[str, bool, str | None]) -> ShardScan:
    return scan_shard(*args)


def index_shards(
    sources: list[str],
    out: str | os.PathLike,
    *,
    images_only: bool = False,
    label_field: str | None = None,
    upsampling_factors: list[float] | None = None,
    workers: int | None = None,
    absolute_paths: bool = False,
    skip_unreadable: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Index ``sources`` and write the manifest to ``out``; return the manifest."""
    from tqdm.auto import tqdm

    groups = expand_sources(sources)
    if upsampling_factors is None:
        upsampling_factors = [1.0] * len(groups)
    if len(upsampling_factors) != len(groups):
        raise DataError(
            f"{len(upsampling_factors)} upsampling factor(s) for {len(groups)} source(s): "
            "give one per source"
        )
    if any(not (f > 0 and math.isfinite(f)) for f in upsampling_factors):
        raise DataError(f"upsampling factors must be > 0, got {upsampling_factors}")
    files = [(str(p), w) for group, w in zip(groups, upsampling_factors) for p in group]
    seen: dict[str, int] = {}
    for i, (f, _) in enumerate(files):
        real = f if is_remote(f) else os.path.realpath(f)
        if real in seen:
            raise DataError(f"{f} is given twice (as shard {seen[real]} and {i})")
        seen[real] = i
    workers = max(1, min(workers or os.cpu_count() or 1, len(files)))
    jobs = [(f, images_only, label_field) for f, _ in files]
    scans: list[ShardScan] = []
    if workers == 1:
        with tqdm(
            total=len(jobs), desc="index", unit="shard", disable=bar_disable(progress)
        ) as bar:
            for job in jobs:
                scans.append(_scan(job))
                bar.update()
    else:
        # a fork server, not a fork of this process: its threads (tqdm's monitor) could hold
        # a lock in the child
        ctx = multiprocessing.get_context("forkserver")
        with ProcessPoolExecutor(workers, mp_context=ctx) as pool:
            results = pool.map(_scan, jobs, chunksize=max(1, len(jobs) // (workers * 8)))
            with tqdm(
                total=len(jobs), desc="index", unit="shard", disable=bar_disable(progress)
            ) as bar:
                for scan in results:
                    scans.append(scan)
                    bar.update()

    bad = [s for s in scans if s.error]
    if bad and not skip_unreadable:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise DataError(
            f"cannot read shard {bad[0].path}: {bad[0].error}{more}; fix it, or pass "
            "--skip-unreadable to leave unreadable shards out of the manifest"
        )
    labels = None
    if label_field is not None:
        wrong = next((s.label_error for s in scans if s.label_error and not s.error), None)
        if wrong:
            raise DataError(wrong)
        values = [v for s in scans if not s.error for v in s.labels]
        if not values:
            raise DataError(f"no usable sample has a {label_field!r} field in its .json")
        labels = label_map(values, f"--label-field {label_field}")

    out_given = str(out)
    out = Path(out)
    if out.is_dir() or out_given.endswith(("/", os.sep)):
        out = out / "manifest.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    base = out.parent.resolve()
    entries, offset, skipped, checks = [], 0, Counter(), []
    for scan, (_, weight) in zip(scans, files):
        if scan.error:
            continue
        if is_remote(scan.path):
            name = public(scan.path)  # never a URL's user part: credentials stay out
        else:
            p = Path(scan.path).resolve()
            rel = os.path.relpath(p, base)
            name = str(p) if absolute_paths or rel.startswith("..") else rel
        entries.append(
            {
                "file": name,
                "num_samples": scan.num_samples,
                "num_raw": scan.num_raw,
                "offset": offset,
                "size": scan.size,
                "mtime_ns": scan.mtime_ns,
                **({"etag": scan.etag} if is_remote(scan.path) else {}),
                "fingerprint": scan.fingerprint,
                # a remote shard's headers are checked chunk by chunk as it is read
                **({"fingerprint_chunks": scan.fingerprint_chunks} if is_remote(scan.path) else {}),
                "weight": weight,
                "keys": dict(sorted(scan.keys.items())),
                "skipped": dict(sorted(scan.skipped.items())),
            }
        )
        offset += scan.num_samples
        skipped.update(scan.skipped)
        if scan.cross_check:
            checks.append(f"{scan.path}: {scan.cross_check}")
    if offset == 0:
        raise DataError(f"none of the {len(scans)} shard(s) holds a usable sample: {dict(skipped)}")
    manifest = {
        "format": FORMAT_NAME,
        "version": FORMAT_VERSION_IN_PLACE,
        "in_place": True,
        "usable_rule": USABLE_RULE,
        "num_samples": offset,
        "num_shards": len(entries),
        "images_only": images_only,
        "shards": entries,
        "label_field": None
        if labels is None
        else {"name": label_field, "from_strings": labels.from_strings},
        "label_names": None if labels is None else labels.names,
        "num_labels": 0 if labels is None else len(labels.names),
        "unlabelled": sum(s.unlabelled for s in scans),
        "skipped": dict(sorted(skipped.items())),
        "unreadable_shards": [{"file": public(s.path), "error": redact(s.error)} for s in bad],
        "cross_check": checks,
        "meta": {"source": "index", "sources": [public(src) for src in sources]},
    }
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(json.dumps(manifest, indent=1) + "\n")
    os.replace(tmp, out)
    return manifest
