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
import re
import tarfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any, BinaryIO
from urllib.parse import urlsplit

from .errors import DataError
from .records import ShardInfo
from .tars import HeaderCheck, read_members
from .urls import public, redact, secret_in

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
    if isinstance(exn, (ConnectionError, TimeoutError, EOFError, tarfile.ReadError, PipeFailed)):
        return True  # tarfile.ReadError / EOFError: a stream cut short; a pipe: that failed
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
    """fsspec's filesystem for ``url``. Web servers are asked with aiohttp's ``trust_env``
    (unless fsspec's config says otherwise), so credentials come from ``~/.netrc`` or
    ``$NETRC`` and proxies from ``HTTP(S)_PROXY``, as for curl."""
    import fsspec

    if urlsplit(url).scheme.lower() in ("http", "https"):
        conf = fsspec.config.conf.get(urlsplit(url).scheme.lower(), {})
        client = {"trust_env": True, **conf.get("client_kwargs", {})}
        return fsspec.core.url_to_fs(url, client_kwargs=client)
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


def check_unchanged(url: str, shard: ShardInfo | None, manifest: str) -> None:
    """Refuse a shard whose size or ETag is not what the manifest recorded."""
    size, etag = (shard.size, shard.etag) if shard is not None else (None, None)
    if url.startswith("pipe:") or (size is None and etag is None):
        return
    now = remote_info(url)
    changes = []
    if size is not None and now.size is not None and now.size != size:
        changes.append(f"{size} -> {now.size} bytes")
    if etag is not None and now.etag is not None and now.etag != etag:
        changes.append(f"ETag {etag} -> {now.etag}")
    if changes:
        raise changed_shard(url, manifest, ", ".join(changes))


def changed_shard(url: str, manifest: str, what: str) -> DataError:
    return DataError(
        f"shard {public(url)} changed since it was indexed into {manifest} ({what}): its "
        "samples and their dataset indices may differ; re-run `clipfnd data index`"
    )


def with_retries(
    what: str,
    url: str,
    work: Callable[[], Any],
    retries: int = DEFAULT_RETRIES,
    backoff: float | None = None,
) -> Any:
    """``work()``, retried after transient failures (``retries`` times at most, waiting
    ``backoff``, then twice as long each time); each retry is logged with the shard's URL."""
    for attempt in range(retries + 1):
        try:
            return work()
        except Exception as e:
            if not is_transient(e) or attempt == retries:
                raise
            _wait_before_retry(f"{what} {public(url)} failed", url, e, attempt, retries, backoff)
    raise AssertionError("unreachable")


def _wait_before_retry(
    what: str, url: str, e: BaseException, attempt: int, retries: int, backoff: float | None
) -> None:
    """Log retry ``attempt + 1`` of ``retries`` (``what`` failed with ``e``), then wait
    ``backoff * 2**attempt`` seconds."""
    wait = (DEFAULT_BACKOFF if backoff is None else backoff) * 2**attempt
    log.warning(
        "%s (%s); retry %d of %d in %.1f s",
        what,
        describe(e, url),
        attempt + 1,
        retries,
        wait,
    )
    time.sleep(wait)


def _first_line(e: BaseException) -> str:
    return redact((str(e).strip().splitlines() or [""])[0][:200])


def _chain(exn: BaseException) -> list[BaseException]:
    """``exn`` and the exceptions it was raised from (fsspec wraps aiohttp's and botocore's)."""
    out: list[BaseException] = []
    while exn is not None and exn not in out and len(out) < 8:
        out.append(exn)
        exn = exn.__cause__ or exn.__context__
    return out


S3_CREDENTIALS = (
    "S3 credentials come from AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, ~/.aws/credentials or "
    "AWS_PROFILE (and AWS_ENDPOINT_URL for an S3-compatible server)"
)
HTTP_CREDENTIALS = (
    "http(s) credentials come from ~/.netrc or $NETRC ('machine HOST login USER password "
    "PASS'); a URL's user:password@ part is never kept in a manifest"
)


def _http_status(e: BaseException) -> int | None:
    status = getattr(e, "status", None)
    if isinstance(status, int) and 100 <= status < 600:
        return status
    response = getattr(e, "response", None)  # botocore's ClientError
    if isinstance(response, dict):
        code = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if isinstance(code, int):
            return code
        text = str(response.get("Error", {}).get("Code", ""))
        if text.isdigit():
            return int(text)
    return None


def _s3_code(e: BaseException) -> str | None:
    response = getattr(e, "response", None)
    if isinstance(response, dict):
        code = response.get("Error", {}).get("Code")
        return str(code) if code else None
    return None


def describe(exn: BaseException, url: str = "") -> str:
    """Why reading ``url`` failed, in one line of words: an HTTP status and what it means, a
    refused connection, credentials missing or refused (with where they come from), a missing
    bucket or object, a ``pipe:`` command's exit status; never a credential."""
    chain = _chain(exn)
    names = {c.__name__ for e in chain for c in type(e).__mro__}
    bucket = urlsplit(url).netloc.rsplit("@", 1)[-1] if url and not url.startswith("pipe:") else ""
    for e in chain:
        code = _s3_code(e)
        if code == "NoSuchBucket":
            return f"bucket {bucket or '?'} does not exist (NoSuchBucket)"
        if code in ("InvalidAccessKeyId", "SignatureDoesNotMatch", "InvalidToken", "ExpiredToken"):
            return f"S3 refused the credentials ({code}): {S3_CREDENTIALS}"
        if code in ("AccessDenied", "AllAccessDisabled"):
            return f"access denied ({code}): the credentials may not read it; {S3_CREDENTIALS}"
        if code in ("NoSuchKey", "404"):
            return "no such object (404)"
    if "NoCredentialsError" in names or "PartialCredentialsError" in names:
        return f"no S3 credentials found: {S3_CREDENTIALS}"
    for e in chain:
        status = _http_status(e)
        if status is None:
            continue
        try:
            words = f"HTTP {status} {HTTPStatus(status).phrase}"
        except ValueError:  # a status the standard library does not name
            words = f"HTTP {status}"
        s3 = urlsplit(url).scheme.lower() in ("s3", "s3a", "gs", "gcs")
        if status == 401 or (status == 403 and s3):
            return f"{words}: credentials missing or refused; " + (
                S3_CREDENTIALS if s3 else HTTP_CREDENTIALS
            )
        if status == 403:
            return f"{words}: the server refuses access (credentials refused, or none given; {HTTP_CREDENTIALS})"
        if status in (404, 410):
            return f"{words}: no shard at this address"
        if status >= 500:
            return f"{words}: the server failed"
        return words
    for e in chain:
        if isinstance(e, ConnectionRefusedError) or "ClientConnectorError" in type(e).__name__:
            host = getattr(e, "host", None) or urlsplit(url).hostname or "the server"
            port = getattr(e, "port", None) or urlsplit(url).port
            where = f"{host}:{port}" if port else str(host)
            return f"connection refused by {where} (no server listening there?)"
        if "ClientConnectorDNSError" in type(e).__name__ or "gaierror" in type(e).__name__:
            return f"cannot resolve the host {urlsplit(url).hostname or '?'}"
        if isinstance(e, TimeoutError) or "Timeout" in type(e).__name__:
            return "timed out"
        if isinstance(e, PipeFailed):
            return str(e)
    return f"{type(exn).__name__}: {_first_line(exn)}"


class Unreachable(OSError):
    """A remote shard that could not be read: after every retry of a transient failure, or
    at once for a lasting one (a 404, credentials refused, a missing bucket)."""

    def __init__(self, url: str, reason: str):
        super().__init__(f"cannot read shard {public(url)}: {reason}")
        self.shard = public(url)
        self.reason = reason


class PipeFailed(OSError):
    """A ``pipe:`` command that exited with a failure status."""


def _pipe_failed(e: BaseException, stream: BinaryIO, url: str) -> PipeFailed | None:
    """A ``pipe:`` command's failure as ``PipeFailed``, its exit status in words: webdataset's
    pipe raises the status as an ``OSError`` when the stream ends or closes, and a command that
    fails before writing anything may first show as an empty tar (``ReadError``). None when the
    command did not fail (the error is the data's)."""
    status = getattr(stream, "status", None)
    if not status:
        found = re.search(r"exit (\d+)", str(e))
        status = int(found.group(1)) if found else None
    if not status and not isinstance(e, OSError):
        return None
    hint = " (curl -f: an HTTP error status)" if status == 22 and "curl" in url else ""
    return PipeFailed(
        f"the pipe: command exited with status {status if status is not None else '?'}{hint}"
    )


def _close(stream: BinaryIO, url: str) -> None:
    """Close a shard's stream; a ``pipe:`` command's failure status as ``PipeFailed``."""
    try:
        stream.close()
    except OSError as e:
        if not url.startswith("pipe:"):
            raise
        raise _pipe_failed(e, stream, url) or PipeFailed(str(e)) from e


def _close_quietly(stream: BinaryIO) -> None:
    """Close a stream while another exception is on its way (a pipe's exit status, which
    closing early may spoil, must not replace it)."""
    try:
        stream.close()
    except Exception:
        pass


def remote_samples(
    url: str,
    handler: Callable[[Exception], bool],
    *,
    shard: ShardInfo | None = None,
    manifest: str = "the manifest",
    retries: int = DEFAULT_RETRIES,
    backoff: float | None = None,
) -> Iterator[dict[str, Any]]:
    """The samples of one remote shard, grouped by key as webdataset's ``tarfile_samples``
    groups them. Before any sample, the shard's size and ETag are compared with ``shard``'s
    (the manifest's); while it is read, its tar headers are, chunk by chunk
    (``tars.HeaderCheck``), and a chunk's samples are handed on only once its headers matched.
    A changed shard raises ``DataError``, whatever ``handler`` does.

    Transient failures are retried (the shard re-read from its start, the samples already
    yielded skipped). A failure that stays after the last retry, or a lasting one (a 404,
    credentials refused, a missing bucket, a ``pipe:`` command that fails) goes to ``handler``
    as an ``Unreachable`` whose message says why in words, and the shard ends there."""
    import webdataset as wds

    def passthrough(exn: Exception) -> bool:
        if is_transient(exn):
            raise exn  # to the retry below
        return handler(exn)

    def changed(what: str) -> DataError:
        return changed_shard(url, manifest, what)

    done, attempt, checked = 0, 0, False
    while True:
        try:
            if not checked:
                check_unchanged(url, shard, manifest)
                checked = True
            check = HeaderCheck(
                shard.fingerprint if shard else None,
                shard.fingerprint_chunks if shard else None,
                changed,
            )
            stream = open_remote(url)
            try:
                with tarfile.open(fileobj=stream, mode="r|") as tar:
                    members = read_members(tar, url, check, hold=check.per_chunk)
                    samples = wds.tariterators.group_by_keys(members, handler=passthrough)
                    for i, sample in enumerate(samples):
                        if i < done:
                            continue  # yielded before the failure
                        done += 1
                        sample["__url__"] = url
                        yield sample
                while stream.read(1 << 16):  # to its end (a pipe's command then exits)
                    pass
            except BaseException as e:
                _close_quietly(stream)  # a pipe's command is waited for: its status is known
                if url.startswith("pipe:") and isinstance(e, (OSError, tarfile.ReadError)):
                    if not isinstance(e, PipeFailed):
                        failed = _pipe_failed(e, stream, url)
                        if failed is not None:  # the command's failure, not what it left
                            raise failed from e
                raise
            _close(stream, url)
            return
        except DataError:
            raise
        except Exception as e:
            if not is_transient(e):
                handler(Unreachable(url, describe(e, url)))
                return
            if attempt == retries:
                handler(Unreachable(url, f"{describe(e, url)}; gave up after {retries} retries"))
                return
            what = f"reading shard {public(url)} failed after {done} samples"
            _wait_before_retry(what, url, e, attempt, retries, backoff)
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
        try:
            fs, path = _filesystem(spec)
            found = sorted(p for p in fs.glob(path.rstrip("/") + "/*.tar"))
            if not found and scheme in ("s3", "s3a", "gs", "gcs"):
                bucket = path.split("/", 1)[0]
                if not fs.exists(bucket):
                    raise DataError(f"bucket {bucket} does not exist ({public(spec)})")
        except DataError:
            raise
        except Exception as e:
            raise DataError(f"cannot list {public(spec)}: {describe(e, spec)}") from None
        if not found:
            raise DataError(f"{public(spec)} holds no .tar shards")
        return [fs.unstrip_protocol(p) for p in found]
    return list(braceexpand(spec))


def check_source(spec: str) -> None:
    """Refuse a remote source whose credentials would be written into a manifest, and say
    (without them) where a URL's ``user:password@`` part goes: nowhere but this index."""
    what = secret_in(spec)
    if what is None:
        return
    if spec.startswith("pipe:"):
        raise DataError(
            f"source {public(spec)} holds credentials ({what}): the manifest records each shard's "
            "command, which every loader runs, so they would be written down. Pass them through "
            "the environment instead: curl --netrc (credentials in ~/.netrc), or -u "
            '"$USER:$PASS" (the shell expands it when the loader runs)'
        )
    if what != "a URL's user:password@ part":
        raise DataError(
            f"source {public(spec)} holds credentials ({what}), which the manifest would keep "
            "and which expire: name the shards without them (s3://, gs://, or https:// with "
            "credentials in ~/.netrc)"
        )
    log.warning(
        "the user:password@ part of %s is used for this index only and is not written into "
        "the manifest: training reads %s without it, so put the credentials in ~/.netrc or "
        "$NETRC ('machine HOST login USER password PASS')",
        public(spec),
        urlsplit(public(spec)).netloc or "the server",
    )
