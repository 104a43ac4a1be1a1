"""The data package's plain records: a sample before it gets its dataset index, an input that
yields none, and one shard of a split as its manifest describes it. They import nothing of the
package, so the modules that read, write and stream shards share them without circles."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RawSample:
    """One sample before it gets its dataset index: encoded image bytes and a caption."""

    image: bytes
    image_ext: str
    caption: str
    label: int | None = None
    source: str = ""  # where it came from (a path or a row), for messages
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class SkippedInput:
    """An input that yields no sample at all (e.g. a missing image file): counted, not written."""

    reason: str
    source: str


@dataclass
class ShardInfo:
    """One shard. ``num_samples`` counts its usable samples. Shards indexed in place
    (``clipfnd data index``) also have ``offset`` (the dataset index of their first usable
    sample), ``num_raw`` (all samples, usable or not), and the size and mtime they had when
    indexed; shards written by clipfnd carry each sample's index in its ``.json`` instead."""

    path: str
    num_samples: int
    offset: int | None = None
    num_raw: int | None = None
    weight: float = 1.0  # upsampling factor under data.resampled
    # a remote shard (``data_pipelines.remote``): its size and ETag when indexed, checked
    # before each read (None: the store gave none)
    size: int | None = None
    etag: str | None = None
    # its tar headers' digest, whole and per chunk (``data_pipelines.tars``), checked as a
    # remote shard is read
    fingerprint: str | None = None
    fingerprint_chunks: list[str] | None = None
