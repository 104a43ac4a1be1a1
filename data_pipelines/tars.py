"""A shard's identity from its tar headers, and its members read as webdataset reads them.

``HeaderFingerprint`` digests a tar's member headers (each member's name, size, mtime and
type, in order): the same for a byte-identical copy of a shard whatever the copy's file mtime,
and different when a member was added, removed, renamed, resized or moved (the same samples
in another order give other headers at the same positions). ``clipfnd data index`` records
the digest of the whole shard and one short digest per ``CHUNK_BYTES`` of it. A local shard's
headers are compared when its mtime changed; a remote shard's (``data_pipelines.remote``)
on every read, chunk by chunk, and a chunk's samples are handed on only once its headers
matched, so a shard rewritten at the same size (reordered samples: every dataset index
pointing at another sample) is refused by name before any of its samples is used, with or
without an ETag.
"""

from __future__ import annotations

import hashlib
import os
import re
import tarfile
from collections.abc import Iterator
from typing import Any

CHUNK_BYTES = 16 << 20  # a chunk digest per 16 MiB of a shard: ~20 short digests a 300 MB shard
# what webdataset's tar reader skips (``tariterators.tar_file_iterator``)
WDS_SKIP_META = re.compile(r"__[^/]*__($|/)")


def _line(info: tarfile.TarInfo) -> bytes:
    return f"{info.name}\0{info.size}\0{info.mtime}\0{info.type!r}\n".encode()


class HeaderFingerprint:
    """The digest of a tar's member headers, and of each chunk of them: a chunk ends with the
    first header whose member data reaches the next multiple of ``chunk_bytes``."""

    def __init__(self, chunk_bytes: int | None = None) -> None:
        self._h = hashlib.blake2b(digest_size=16)
        self._c = hashlib.blake2b(digest_size=8)
        self._chunk_bytes = chunk_bytes or CHUNK_BYTES
        self._next = self._chunk_bytes
        self._open = False
        self.chunks: list[str] = []

    def add(self, info: tarfile.TarInfo) -> bool:
        """Add one header; True when it closed a chunk (its digest is then ``chunks[-1]``)."""
        line = _line(info)
        self._h.update(line)
        self._c.update(line)
        self._open = True
        end = info.offset_data + info.size
        if end < self._next:
            return False
        self.chunks.append(self._c.hexdigest())
        self._c = hashlib.blake2b(digest_size=8)
        self._open = False
        self._next = (end // self._chunk_bytes + 1) * self._chunk_bytes
        return True

    def finish(self) -> list[str]:
        """Close the last chunk; the chunk digests."""
        if self._open:
            self.chunks.append(self._c.hexdigest())
            self._open = False
        return self.chunks

    def hexdigest(self) -> str:
        return "blake2b-128:" + self._h.hexdigest()


def tar_fingerprint(path: str | os.PathLike) -> str:
    """``HeaderFingerprint`` of a local tar (its headers only are read)."""
    fp = HeaderFingerprint()
    with tarfile.open(path, mode="r:") as tar:
        for info in tar:
            fp.add(info)
            tar.members = []  # headers are not kept
    return fp.hexdigest()


def is_sample_member(info: tarfile.TarInfo) -> bool:
    """Whether webdataset's tar reader hands this member on (a regular file, not metadata)."""
    name = info.name
    if not info.isreg() or name is None:
        return False
    if "/" not in name and name.startswith("__") and name.endswith("__"):
        return False
    return not WDS_SKIP_META.match(name)


class HeaderCheck:
    """Compares a shard's headers, as they are read, with what its manifest recorded: each
    chunk's digest as the chunk closes (``chunks``, when recorded), the whole digest and the
    number of chunks at the end. A difference raises ``changed(what)``."""

    def __init__(self, fingerprint: str | None, chunks: list[str] | None, changed):
        self.expected, self.expected_chunks = fingerprint, chunks
        self.changed = changed
        self.fp = HeaderFingerprint()

    @property
    def per_chunk(self) -> bool:
        return self.expected_chunks is not None

    def add(self, info: tarfile.TarInfo) -> bool:
        """Add a header; True when it closed a chunk that matched."""
        if not self.fp.add(info):
            return False
        self._check_chunk(len(self.fp.chunks) - 1)
        return True

    def _check_chunk(self, i: int) -> None:
        want = self.expected_chunks
        if want is None:
            return
        if i >= len(want) or want[i] != self.fp.chunks[i]:
            raise self.changed(
                f"its tar headers differ from the indexed ones in chunk {i + 1} of {len(want)}"
            )

    def end(self) -> None:
        """The shard's end: its last chunk, its chunk count and its whole digest."""
        before = len(self.fp.chunks)
        chunks = self.fp.finish()
        if len(chunks) > before:
            self._check_chunk(len(chunks) - 1)
        if self.expected_chunks is not None and len(chunks) != len(self.expected_chunks):
            raise self.changed(
                f"it ends after {len(chunks)} of its {len(self.expected_chunks)} indexed chunks "
                "of tar headers"
            )
        if self.expected is not None and self.fp.hexdigest() != self.expected:
            raise self.changed("its tar headers differ from the indexed ones")


def read_members(
    tar: tarfile.TarFile, url: str, check: HeaderCheck | None = None, hold: bool = False
) -> Iterator[dict[str, Any]]:
    """The members of an open tar (stream mode) as webdataset's tar reader yields them
    (``{"fname", "data", "__url__"}``, the same filters), every header going into ``check``.
    ``hold``: a chunk's members are handed on only once its headers matched (at most a chunk
    of ``CHUNK_BYTES`` and one member are held)."""
    held: list[dict[str, Any]] = []
    for info in tar:
        closed = check.add(info) if check is not None else False
        if is_sample_member(info):
            data = tar.extractfile(info).read()
            held.append({"fname": info.name, "data": data, "__url__": url})
        tar.members = []  # headers are not kept: a shard of any size in constant memory
        if not hold or closed:
            yield from held
            held = []
    if check is not None:
        check.end()
    yield from held
