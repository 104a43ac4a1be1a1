"""Shards that are not local files: object storage (``s3://``, ``gs://``) and the web
(``http://``, ``https://``) through fsspec (``s3fs`` and ``gcsfs`` are optional extras; fsspec
has http), and open_clip's ``pipe:COMMAND`` (``pipe:aws s3 cp s3://... -``) through
webdataset's opener. Credentials come from where each library looks for them (the
environment, ``~/.aws``, fsspec's config, e.g. ``AWS_ENDPOINT_URL`` or
``FSSPEC_S3_ENDPOINT_URL`` for an S3-compatible server); clipfnd never writes them down:
``public`` strips a URL's user part before it goes into a manifest or a log line.

Remote shards are read as streams. A transient failure (a connection reset or dropped mid-shard,
a 5xx or 429 answer, a timeout, a stream cut short) is retried with exponential backoff a
bounded number of times, each retry logged with the shard's URL; a retry re-reads the shard
from its start and skips the samples already yielded, so the samples (and with them resume
positions) are exactly those of an uninterrupted read. A shard whose size or ETag differs
from what ``clipfnd data index`` recorded is refused by name.
"""

from __future__ import annotations

import errno
import logging
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from .shards import DataError
from .urls import public

log = logging.getLogger("data_pipelines.remote")

DEFAULT_RETRIES = 3
DEFAULT_BACKOFF = 0.5  # seconds before the first retry, doubled for each next one

# class names (anywhere in an exception's MRO) of the transient errors of aiohttp (fsspec's
# http) and botocore (s3fs): matched by name, so that neither is imported here
TRANSIENT_NAMES = {
    "ClientPayloadError",
    "ClientConnectionError",
    "ClientOSError",
    "ServerDisconnectedError",
    "ServerTimeoutError",
    "ContentLengthError",
    "EndpointConnectionError",
    "ConnectionClosedError",
    "ReadTimeoutError",
    "ConnectTimeoutError",
    "ResponseStreamingError",
    "IncompleteReadError",
}
TRANSIENT_ERRNOS = {errno.ECONNRESET, errno.ECONNABORTED, errno.EPIPE, errno.ETIMEDOUT}


def is_transient(exn: BaseException) -> bool:
    """A failure that may not happen again: worth a retry."""
    if isinstance(exn, (ConnectionError, TimeoutError, EOFError, tarfile.ReadError)):
        return True  # tarfile.ReadError / EOFError: a stream cut short
    names = {c.__name__ for c in type(exn).__mro__}
    if names & TRANSIENT_NAMES:
        return True
    status = getattr(exn, "status", None) or getattr(exn, "code", None)
    if isinstance(status, int) and (status >= 500 or status == 429):
        return True  # aiohttp.ClientResponseError of a 5xx or 429 answer
    if isinstance(exn, OSError) and exn.errno in TRANSIENT_ERRNOS:
        return True
    cause = exn.__cause__ or exn.__context__
    return cause is not None and cause is not exn and is_transient(cause)


@dataclass
class RemoteInfo:
    """What the store says of a shard: its size and ETag (None where it says none)."""

    size: int | None
    etag: str | None


def _filesystem(url: str):
    import fsspec

    return fsspec.core.url_to_fs(url)


def remote_info(url: str) -> RemoteInfo:
    """The shard's size and ETag (one request; ``pipe:`` sources have neither)."""
    if url.startswith("pipe:"):
        return RemoteInfo(None, None)
    fs, path = _filesystem(url)
    info = fs.info(path)
    etag = info.get("ETag", info.get("etag"))
    size = info.get("size")
    return RemoteInfo(
        int(size) if isinstance(size, int) else None,
        str(etag).strip('"') if etag not in (None, "") else None,
    )


def open_remote(url: str) -> BinaryIO:
    """A stream of the shard's bytes from its start."""
    if url.startswith("pipe:"):
        from webdataset.gopen import gopen

        return gopen(url, "rb")
    fs, path = _filesystem(url)
    if urlsplit(url).scheme.lower() in ("http", "https"):
        return fs.open(path, "rb", block_size=0)  # one streamed GET, no range requests
    return fs.open(path, "rb")


def check_unchanged(url: str, size: int | None, etag: str | None, manifest: str) -> None:
    """Refuse a shard whose size or ETag is not what the manifest recorded."""
    if url.startswith("pipe:") or (size is None and etag is None):
        return
    now = remote_info(url)
    changes = []
    if size is not None and now.size is not None and now.size != size:
        changes.append(f"{size} -> {now.size} bytes")
    if etag is not None and now.etag is not None and now.etag != etag:
        changes.append(f"ETag {etag} -> {now.etag}")
    if changes:
        raise DataError(
            f"shard {public(url)} changed since it was indexed into {manifest} "
            f"({', '.join(changes)}): its samples and their dataset indices may differ; re-run "
            "`clipfnd data index`"
        )


def with_retries(
    what: str,
    url: str,
    work: Callable[[], Any],
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
) -> Any:
    """``work()``, retried after transient failures (``retries`` times at most, waiting
    ``backoff``, then twice as long each time); each retry is logged with the shard's URL."""
    for attempt in range(retries + 1):
        try:
            return work()
        except Exception as e:
            if not is_transient(e) or attempt == retries:
                raise
            _wait_before_retry(f"{what} {public(url)} failed", e, attempt, retries, backoff)
    raise AssertionError("unreachable")


def _wait_before_retry(
    what: str, e: BaseException, attempt: int, retries: int, backoff: float
) -> None:
    """Log retry ``attempt + 1`` of ``retries`` (``what`` failed with ``e``), then wait
    ``backoff * 2**attempt`` seconds."""
    wait = backoff * 2**attempt
    log.warning(
        "%s (%s: %s); retry %d of %d in %.1f s",
        what,
        type(e).__name__,
        _first_line(e),
        attempt + 1,
        retries,
        wait,
    )
    time.sleep(wait)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


class Unreachable(OSError):
    """A remote shard that still failed after every retry."""


def remote_samples(
    url: str,
    handler: Callable[[Exception], bool],
    *,
    size: int | None = None,
    etag: str | None = None,
    manifest: str = "the manifest",
    retries: int = DEFAULT_RETRIES,
    backoff: float = DEFAULT_BACKOFF,
) -> Iterator[dict[str, Any]]:
    """The samples of one remote shard, grouped by key as webdataset's ``tarfile_samples``
    groups them. Transient failures are retried (the shard re-read from its start, the
    samples already yielded skipped); other read errors go to ``handler`` as webdataset's
    would. After the last retry the failure goes to ``handler`` as an ``Unreachable``."""
    import webdataset as wds

    with_retries(
        "checking shard", url, lambda: check_unchanged(url, size, etag, manifest), retries, backoff
    )

    def passthrough(exn: Exception) -> bool:
        if is_transient(exn):
            raise exn  # to the retry below
        return handler(exn)

    done, attempt = 0, 0
    while True:
        try:
            stream = open_remote(url)
            try:
                files = wds.tariterators.tar_file_expander(
                    iter([{"url": url, "stream": stream}]), handler=passthrough
                )
                for i, sample in enumerate(
                    wds.tariterators.group_by_keys(files, handler=passthrough)
                ):
                    if i < done:
                        continue  # yielded before the failure
                    done += 1
                    sample["__url__"] = url
                    yield sample
            finally:
                stream.close()
            return
        except Exception as e:
            if not is_transient(e):
                raise
            if attempt == retries:
                handler(
                    Unreachable(
                        f"{public(url)} unreachable after {retries} retries "
                        f"({type(e).__name__}: {_first_line(e)})"
                    )
                )
                return
            what = f"reading shard {public(url)} failed after {done} samples"
            _wait_before_retry(what, e, attempt, retries, backoff)
            attempt += 1


def expand_remote(spec: str) -> list[str]:
    """The shard URLs of a remote source: a brace pattern (``s3://b/p/{00000..00099}.tar``),
    one URL, or, for a store that lists (s3, gs), a prefix ending in ``/`` (its ``*.tar``,
    sorted)."""
    from braceexpand import braceexpand

    if spec.startswith("pipe:"):  # open_clip's form: the braces expand into commands
        return list(braceexpand(spec))
    scheme = urlsplit(spec).scheme.lower()
    if spec.endswith("/") and scheme not in ("http", "https"):
        fs, path = _filesystem(spec)
        found = sorted(p for p in fs.glob(path.rstrip("/") + "/*.tar"))
        if not found:
            raise DataError(f"{public(spec)} holds no .tar shards")
        return [fs.unstrip_protocol(p) for p in found]
    return list(braceexpand(spec))
