"""Which shard names are remote, and what of a URL may be written down (no imports, so that
the manifest reader and the remote reader can both use it)."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit, urlunsplit

# read through fsspec (data_pipelines.remote); ``pipe:COMMAND`` through webdataset's opener
FSSPEC_SCHEMES = ("s3", "s3a", "gs", "gcs", "http", "https")


def is_remote(spec: str | Any) -> bool:
    """Whether ``spec`` names a shard that is not a local path."""
    text = str(spec)
    return text.startswith("pipe:") or urlsplit(text).scheme.lower() in FSSPEC_SCHEMES


def public(url: str) -> str:
    """``url`` without a user part (``https://user:secret@host/x`` -> ``https://host/x``): what
    a manifest, a config or a log line may hold."""
    if url.startswith("pipe:"):
        return url
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))
