"""Which shard names are remote, and what of a URL or a message may be written down (no
imports beyond the standard library, so that the manifest reader, the remote reader and the
command line can all use it).

``redact`` is the one place where a text that may hold a credential is made public before it
is written anywhere: a manifest, a log line, an error, ``metrics.jsonl``, the report. It
covers a URL's ``user:password@`` part wherever a URL appears in the text (fsspec's, s3fs's,
aiohttp's and botocore's exception texts quote the URL they were given), signed or keyed query
parameters (``X-Amz-Signature=...``, ``sig=...``, ``token=...``), and the credentials of a
``pipe:`` command (``curl -u user:pass``, ``--user=...``, an ``Authorization:`` header).
``RedactingFilter`` applies it to every log record a handler writes.
"""

from __future__ import annotations

import logging
import re
from typing import Any
from urllib.parse import urlsplit

# read through fsspec (data_pipelines.remote); ``pipe:COMMAND`` through webdataset's opener
FSSPEC_SCHEMES = ("s3", "s3a", "gs", "gcs", "http", "https")
HIDDEN = "***"

# scheme://USERINFO@  (the user part of any URL in a text)
_USERINFO = re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.\-]*://)[^/\s@'\"<>?#]+@")
# query parameters that carry a signature, a token or a key
_SECRET_PARAMS = (
    "x-amz-signature|x-amz-credential|x-amz-security-token|x-goog-signature|x-goog-credential"
    "|signature|sig|token|access_token|id_token|auth|authorization|key|api_key|apikey"
    "|password|passwd|secret|client_secret|sas"
)
_SECRET_QUERY = re.compile(rf"(?i)([?&;](?:{_SECRET_PARAMS})=)[^&;\s'\"#]+")
# an environment variable reference: what a shell expands when the command runs
_ENV_ONLY = re.compile(r"""^(?:\$\{?\w+\}?|:)+$""")
# command-line credentials: curl's -u/--user, wget's --password/--http-password, aws's keys
_OPTION = re.compile(
    r"(?P<opt>(?:^|\s)(?:-u|--user|--password|--http-password|--proxy-user|--aws-secret-access-key"
    r"|--aws-access-key-id|--oauth2-bearer)(?:\s+|=))(?P<q>['\"]?)(?P<value>[^\s'\"]+)"
)
# an Authorization (or Proxy-Authorization, X-Api-Key, ...) header's value
_HEADER = re.compile(
    r"(?i)(?P<name>\b(?:proxy-)?authorization:\s*|\bx-api-key:\s*|\bx-auth-token:\s*)"
    r"(?P<value>[^'\"\n]+)"
)


def is_remote(spec: str | Any) -> bool:
    """Whether ``spec`` names a shard that is not a local path."""
    text = str(spec)
    return text.startswith("pipe:") or urlsplit(text).scheme.lower() in FSSPEC_SCHEMES


def _option(m: re.Match) -> str:
    value = m.group("value")
    if _ENV_ONLY.match(value):  # "$USER:$PASS": the shell's, not a secret written here
        return m.group(0)
    return f"{m.group('opt')}{m.group('q')}{HIDDEN}"


def _header(m: re.Match) -> str:
    value = m.group("value").strip()
    if _ENV_ONLY.match(value.split()[-1] if value else ""):
        return m.group(0)
    return f"{m.group('name')}{HIDDEN}"


def redact(text: str) -> str:
    """``text`` with every credential it may hold replaced by ``***``, or dropped where a URL's
    user part is (``https://user:secret@host/x`` -> ``https://host/x``)."""
    if not text:
        return text
    out = _USERINFO.sub(r"\g<scheme>", text)
    out = _SECRET_QUERY.sub(rf"\g<1>{HIDDEN}", out)
    out = _OPTION.sub(_option, out)
    return _HEADER.sub(_header, out)


def public(url: str) -> str:
    """``url`` (or a ``pipe:`` command) as a manifest, a config or a log line may hold it:
    ``redact``'s form."""
    return redact(url)


def secret_in(spec: str) -> str | None:
    """What credential ``spec`` (a URL or a ``pipe:`` command) holds, in words, or None."""
    if _USERINFO.search(spec):
        return "a URL's user:password@ part"
    if _SECRET_QUERY.search(spec):
        return "a signed or keyed query parameter"
    if _OPTION.sub(_option, spec) != spec:
        return "a credential option (-u/--user/--password)"
    if _HEADER.sub(_header, spec) != spec:
        return "an Authorization header"
    return None


class RedactingFilter(logging.Filter):
    """A handler filter that passes every record on with ``redact`` applied to its message
    (and to the traceback text of an exception logged with it)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a record whose arguments do not format: leave it to the handler
            return True
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            import traceback

            text = "".join(traceback.format_exception(*record.exc_info))
            record.exc_text = redact(text.rstrip("\n"))
            record.exc_info = None
        return True
