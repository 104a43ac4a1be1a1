"""Writing WebDataset shards with dense dataset indices, and reading their manifest.

Every sample written here gets its dense dataset index ``n`` in ``[0, N)`` in write order:
in ``__key__`` (zero-padded) and in the sample's ``.json``. Samples that cannot be used
(unreadable image, empty caption) are skipped *before* an index is given, so indices stay
dense, and the skips are counted in the manifest.

A shard folder looks like::

    DIR/shard-000000.tar  DIR/shard-000001.tar ...  DIR/manifest.json

``manifest.json`` records the sample count of every shard (the loader needs it to give every
rank the same number of batches), the label names when the data has labels, and where the
data came from.
"""

from __future__ import annotations

import io
import json
import logging
import os
import stat
import tarfile
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import DataError
from .progress import bar_disable
from .records import RawSample, ShardInfo, SkippedInput
from .tars import tar_fingerprint
from .urls import is_remote

log = logging.getLogger("data_pipelines")

if TYPE_CHECKING:
    import webdataset as wds

# webdataset (which imports torch) and PIL are imported where they are used, so that
# ``clipfnd data ... --help`` and ``from data_pipelines import DataError`` stay light.

MANIFEST_NAME = "manifest.json"
SHARD_PATTERN = "shard-{:06d}.tar"
FORMAT_NAME = "clipfnd-shards"
FORMAT_VERSION = 1
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")


@dataclass
class LabelField:
    """Labels read from a ``.json`` field of shards indexed in place: integers as they are,
    strings by their position in the sorted names (``data_pipelines.labels``)."""

    name: str
    names: list[str]
    from_strings: bool

    def __post_init__(self) -> None:
        self._ids = {n: i for i, n in enumerate(self.names)} if self.from_strings else {}

    def id_of(self, meta: dict[str, Any]) -> int:
        from .labels import INT_TEXT

        value = meta.get(self.name)
        if self.from_strings:
            return self._ids.get(value, -1) if isinstance(value, str) else -1
        if isinstance(value, str) and INT_TEXT.fullmatch(value):
            value = int(value)
        return value if isinstance(value, int) and not isinstance(value, bool) else -1


@dataclass
class ShardSet:
    """The shards of one split and what the manifest says about them."""

    root: str
    shards: list[ShardInfo]
    label_names: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    in_place: bool = False  # indexed in place: index = shard offset + usable position
    images_only: bool = False  # in place: a sample without a caption is usable
    label_field: LabelField | None = None  # in place: where labels come from
    manifest: str = ""  # the manifest file it was loaded from

    def unusable(self, sample: dict[str, Any]) -> str | None:
        """In place: why a sample (members grouped by key, as read) gets no dataset index."""
        ext = image_ext(sample)
        return unusable_reason(
            len(sample[ext]) if ext else None,
            sample.get("txt"),
            sample.get("json"),
            images_only=self.images_only,
        )

    def label_of(self, meta: dict[str, Any]) -> int:
        """A sample's label id from its ``.json`` (-1: none)."""
        if self.label_field is not None:
            return self.label_field.id_of(meta)
        label = meta.get("label", -1)
        return label if isinstance(label, int) and not isinstance(label, bool) else -1

    @property
    def num_samples(self) -> int:
        return sum(s.num_samples for s in self.shards)

    @property
    def num_shards(self) -> int:
        return len(self.shards)

    @property
    def num_labels(self) -> int:
        return len(self.label_names) if self.label_names else 0


def check_image(data: bytes) -> str | None:
    """Return None if ``data`` decodes as an image, else the reason it does not."""
    if not data:
        return "zero-byte image"
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()
    except Exception as e:  # PIL raises many types for bad bytes
        return f"unreadable image ({type(e).__name__}: {e})"
    return None


class ShardWriter:
    """Writes samples into numbered shards of ``shard_size`` samples and a manifest.

    Output is deterministic: the same samples in the same order give the same bytes
    (fixed tar mtime, owner and mode). Each shard is written to a temporary name and
    renamed when complete, so a crash never leaves a half-written shard under a real name.
    The tar writing is webdataset's ``TarWriter``; the rotation is ours because
    ``webdataset.ShardWriter`` opens each shard under its final name and does not count what
    each shard holds, which the manifest records.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        shard_size: int = 1000,
        *,
        verify_images: bool = True,
        images_only: bool = False,
    ):
        if shard_size < 1:
            raise DataError(f"--shard-size must be >= 1, got {shard_size}")
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        existing = sorted(self.out_dir.glob("shard-*.tar"))
        if existing:
            raise DataError(
                f"{self.out_dir} already holds shards ({existing[0].name}, ...); "
                "write into an empty folder"
            )
        self.shard_size = shard_size
        self.verify_images = verify_images
        self.images_only = images_only  # vision-only data: no caption needed, none written
        self.shards: list[ShardInfo] = []
        self.skipped: dict[str, int] = {}
        self.skipped_examples: list[str] = []
        self._tar: wds.TarWriter | None = None
        self._stream = None
        self._in_shard = 0
        self._next_index = 0

    @property
    def num_written(self) -> int:
        return self._next_index

    def skip(self, reason: str, source: str) -> None:
        """Count an input that will not become a sample (``reason`` up to " (" is its kind)."""
        kind = reason.split(" (")[0]
        self.skipped[kind] = self.skipped.get(kind, 0) + 1
        if len(self.skipped_examples) < 20:
            self.skipped_examples.append(f"{source}: {reason}")

    def _open_next(self) -> None:
        name = SHARD_PATTERN.format(len(self.shards))
        self._tmp_path = self.out_dir / (name + ".tmp")
        self._final_path = self.out_dir / name
        import webdataset as wds

        self._stream = open(self._tmp_path, "wb")
        self._tar = wds.TarWriter(self._stream, user="clipfnd", group="clipfnd", mtime=0.0)
        self._in_shard = 0

    def _close_current(self) -> None:
        if self._tar is None:
            return
        self._tar.close()  # closes the stream too
        os.replace(self._tmp_path, self._final_path)
        self.shards.append(ShardInfo(self._final_path.name, self._in_shard))
        self._tar = None

    def write(self, sample: RawSample) -> int | None:
        """Write one sample; return its dataset index, or None if it was skipped."""
        caption = sample.caption.strip() if sample.caption else ""
        if not caption and not self.images_only:
            self.skip("empty caption", sample.source)
            return None
        ext = sample.image_ext.lower().lstrip(".")
        if ext == "jpeg":
            ext = "jpg"
        if ext not in IMAGE_EXTENSIONS:
            self.skip(f"unsupported image type .{ext}", sample.source)
            return None
        if self.verify_images:
            bad = check_image(sample.image)
            if bad:
                self.skip(bad, sample.source)
                return None
        if self._tar is None:
            self._open_next()
        n = self._next_index
        meta: dict[str, Any] = {"index": n}
        if sample.label is not None:
            meta["label"] = int(sample.label)
        meta.update(sample.extra)
        record = {
            "__key__": f"{n:09d}",
            ext: sample.image,
            "json": json.dumps(meta, sort_keys=True).encode("utf-8"),
        }
        if caption:
            record["txt"] = caption.encode("utf-8")
        self._tar.write(record)
        self._next_index += 1
        self._in_shard += 1
        if self._in_shard >= self.shard_size:
            self._close_current()
        return n

    def write_all(self, samples: Iterable[RawSample]) -> None:
        for s in samples:
            self.write(s)

    def finish(
        self, *, label_names: list[str] | None = None, meta: dict[str, Any] | None = None
    ) -> ShardSet:
        """Close the last shard and write ``manifest.json``; return the ShardSet."""
        self._close_current()
        if not self.shards:
            raise DataError(
                f"no usable sample was written to {self.out_dir} "
                f"(skipped: {self.skipped or 'none'}; e.g. {self.skipped_examples[:3]})"
            )
        manifest = {
            "format": FORMAT_NAME,
            "version": FORMAT_VERSION,
            "num_samples": self.num_written,
            "num_shards": len(self.shards),
            "shards": [{"file": s.path, "num_samples": s.num_samples} for s in self.shards],
            "label_names": label_names,
            "num_labels": len(label_names) if label_names else 0,
            "skipped": dict(sorted(self.skipped.items())),
            "meta": meta or {},
        }
        tmp = self.out_dir / (MANIFEST_NAME + ".tmp")
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True) + "\n")
        os.replace(tmp, self.out_dir / MANIFEST_NAME)
        return load_shard_set(self.out_dir)


def load_shard_set(spec: str | os.PathLike) -> ShardSet:
    """Open a split: a folder with ``manifest.json``, or the manifest file itself.

    Shards listed in the manifest must exist; a missing one is named in the error.
    """
    path = Path(spec)
    manifest_path = path / MANIFEST_NAME if path.is_dir() else path
    if not manifest_path.exists():
        if path.is_dir() and sorted(path.glob("*.tar")):
            raise DataError(
                f"{path} holds .tar shards but no {MANIFEST_NAME}: clipfnd needs every sample's "
                "dense dataset index and every shard's sample count; index the shards where "
                f"they are with `clipfnd data index {path} --out {path}` (it writes "
                f"{path / MANIFEST_NAME})"
            )
        raise DataError(f"no dataset at {spec}: expected a folder with {MANIFEST_NAME}")
    try:
        manifest = json.loads(manifest_path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{manifest_path} is not valid JSON: {e}") from e
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT_NAME:
        raise DataError(f"{manifest_path} is not a {FORMAT_NAME} manifest")
    if manifest.get("in_place"):
        return _load_in_place(manifest, manifest_path)
    root = manifest_path.parent
    entries = manifest.get("shards")
    if not isinstance(entries, list) or not entries:
        raise DataError(f'{manifest_path} lists no shards (its "shards" must be a non-empty list)')
    shards = []
    for i, entry in enumerate(entries):
        file = entry.get("file") if isinstance(entry, dict) else None
        count = entry.get("num_samples") if isinstance(entry, dict) else None
        if not isinstance(file, str) or not file:
            raise DataError(f'{manifest_path}: shard entry {i} has no "file" name')
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise DataError(
                f"{manifest_path}: shard {file} has num_samples={count!r}; expected a count >= 0"
            )
        p = root / file
        _check_shard_file(p, manifest_path)
        shards.append(ShardInfo(str(p), count))
    return ShardSet(
        root=str(root),
        shards=shards,
        label_names=manifest.get("label_names"),
        meta=manifest.get("meta", {}),
        manifest=str(manifest_path),
    )


def _load_in_place(manifest: dict[str, Any], manifest_path: Path) -> ShardSet:
    """A manifest of ``clipfnd data index``: every shard must still be what was indexed
    (same size and mtime) and the offsets must follow from the counts."""
    root = manifest_path.parent
    entries = manifest.get("shards")
    if not isinstance(entries, list) or not entries:
        raise DataError(f'{manifest_path} lists no shards (its "shards" must be a non-empty list)')
    shards, offset, copies = [], 0, 0
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("file"), str):
            raise DataError(f'{manifest_path}: shard entry {i} has no "file" name')
        file = entry["file"]
        remote = is_remote(file)
        fields = {k: entry.get(k) for k in ("num_samples", "num_raw", "offset", "size")}
        if remote and fields["size"] is None:  # pipe: sources have no size
            fields.pop("size")
        bad = [k for k, v in fields.items() if not isinstance(v, int) or v < 0]
        if bad or not (remote or isinstance(entry.get("mtime_ns"), int)):
            raise DataError(
                f"{manifest_path}: shard {file} has no valid {', '.join(bad) or 'mtime_ns'}; "
                "re-run `clipfnd data index`"
            )
        if fields["offset"] != offset or fields["num_samples"] > fields["num_raw"]:
            raise DataError(
                f"{manifest_path}: shard {file} has offset {fields['offset']} and "
                f"{fields['num_samples']} of {fields['num_raw']} samples usable, which do not "
                f"follow from the shards before it (expected offset {offset}); the manifest "
                "was edited: re-run `clipfnd data index`"
            )
        offset += fields["num_samples"]
        weight = entry.get("weight", 1.0)
        if not isinstance(weight, (int, float)) or not weight > 0:
            raise DataError(f"{manifest_path}: shard {file} has weight {weight!r}; expected > 0")
        if remote:  # its size, ETag and headers are checked as it is read (data_pipelines.remote)
            shards.append(_remote_shard(entry, fields, offset, float(weight), manifest_path))
            continue
        p = root / file
        _check_shard_file(p, manifest_path)
        st = p.stat()
        if st.st_size != fields["size"] or st.st_mtime_ns != entry["mtime_ns"]:
            resized = st.st_size != fields["size"]
            if not resized and _same_headers(p, entry.get("fingerprint")):
                copies += 1  # a copy (new mtime, same size and member headers)
            else:
                what = f"{fields['size']} -> {st.st_size} bytes" if resized else "modified"
                if not resized and "fingerprint" not in entry:
                    what += "; its manifest predates header fingerprints, which accept copies"
                raise DataError(
                    f"shard {p} changed since it was indexed into {manifest_path} ({what}): "
                    "its samples and their dataset indices may differ; re-run `clipfnd data "
                    "index`"
                )
        shards.append(
            ShardInfo(
                str(p),
                fields["num_samples"],
                offset - fields["num_samples"],
                fields["num_raw"],
                float(weight),
            )
        )
    if copies:
        log.info(
            "%s: %d shard(s) have new mtimes and the sizes and tar headers that were indexed "
            "(copies): accepted",
            manifest_path,
            copies,
        )
    if offset == 0:
        raise DataError(f"{manifest_path}: none of its shards holds a usable sample")
    if manifest.get("num_samples") != offset:
        raise DataError(
            f"{manifest_path}: num_samples {manifest.get('num_samples')!r} is not the sum of its "
            f"shards' ({offset}); the manifest was edited: re-run `clipfnd data index`"
        )
    if manifest.get("usable_rule") != USABLE_RULE:
        raise DataError(
            f"{manifest_path} was written by another version of `clipfnd data index` (rule "
            f"{manifest.get('usable_rule')!r}, this one counts usable samples by rule "
            f"{USABLE_RULE}); re-run `clipfnd data index`"
        )
    label = manifest.get("label_field")
    label_field = None
    if label is not None:
        if not isinstance(label, dict) or not isinstance(label.get("name"), str):
            raise DataError(f"{manifest_path}: malformed label_field")
        label_field = LabelField(
            label["name"], list(manifest.get("label_names") or []), bool(label.get("from_strings"))
        )
    return ShardSet(
        root=str(root),
        shards=shards,
        label_names=manifest.get("label_names"),
        meta=manifest.get("meta", {}),
        in_place=True,
        images_only=bool(manifest.get("images_only")),
        label_field=label_field,
        manifest=str(manifest_path),
    )


# The version of ``unusable_reason``: a manifest indexed by another rule would give other
# dataset indices, so it is refused.
USABLE_RULE = 1
TAR_MIN_BYTES = 1024  # a tar ends with two 512-byte zero blocks


def _remote_shard(
    entry: dict[str, Any], fields: dict[str, int], end: int, weight: float, manifest_path: Path
) -> ShardInfo:
    """A remote shard's entry: what its reads are checked against."""
    etag, fingerprint, chunks = (
        entry.get(k) for k in ("etag", "fingerprint", "fingerprint_chunks")
    )
    if chunks is not None and not (
        isinstance(chunks, list) and chunks and all(isinstance(c, str) for c in chunks)
    ):
        raise DataError(
            f"{manifest_path}: shard {entry['file']} has a malformed fingerprint_chunks; re-run "
            "`clipfnd data index`"
        )
    return ShardInfo(
        entry["file"],
        fields["num_samples"],
        end - fields["num_samples"],
        fields["num_raw"],
        weight,
        fields.get("size"),
        etag if isinstance(etag, str) else None,
        fingerprint if isinstance(fingerprint, str) else None,
        chunks,
    )


def _same_headers(p: Path, fingerprint: Any) -> bool:
    """Whether shard ``p`` has the member headers ``fingerprint`` (a manifest's) describes."""
    if not isinstance(fingerprint, str):
        return False
    try:
        return tar_fingerprint(p) == fingerprint
    except (OSError, EOFError, tarfile.TarError):
        return False


def _check_shard_file(p: Path, manifest_path: Path) -> None:
    """A shard must be a readable regular file of at least a tar's size: a FIFO, a device or a
    folder in its place would hang or fail the loader later, far from the cause."""
    try:
        st = p.stat()
    except FileNotFoundError:
        raise DataError(f"shard {p} is listed in {manifest_path} but does not exist") from None
    except OSError as e:
        raise DataError(f"shard {p}: cannot read it ({e.strerror or e})") from e
    if not stat.S_ISREG(st.st_mode):
        raise DataError(f"shard {p} is not a regular file (a folder, FIFO or device?)")
    if st.st_size < TAR_MIN_BYTES:
        raise DataError(f"shard {p} has {st.st_size} bytes, too few for a tar file")
    if not os.access(p, os.R_OK):
        raise DataError(f"shard {p} is not readable (permissions)")


def unusable_reason(
    image_size: int | None, caption: bytes | None, meta: bytes | None, *, images_only: bool
) -> str | None:
    """Why a sample of shards indexed in place gets no dataset index, or None if it gets one.

    The one rule shared by ``clipfnd data index`` (which sees image sizes, not bytes) and the
    loader, so both count the same usable samples: an image member with bytes, a caption
    unless ``images_only``, and, when the ``.json`` has img2dataset's ``status``, "success".
    Nothing is decoded: an image that turns out unreadable, or a caption that is not UTF-8,
    keeps its index and is skipped by the loader like any bad sample (``clipfnd data verify``
    lists such captions).
    """
    if meta is not None:
        try:
            parsed = json.loads(meta)
        except (json.JSONDecodeError, UnicodeDecodeError):
            return "unreadable .json"
        if not isinstance(parsed, dict):
            return "unreadable .json"
        status = parsed.get("status")
        if status is not None and status != "success":
            return f"failed entry (status {status})"
    if image_size is None:
        return "no image"
    if image_size == 0:
        return "zero-byte image"
    if not images_only and not (caption or b"").decode("utf-8", errors="replace").strip():
        return "empty caption"
    return None


def caption_not_utf8(error: UnicodeDecodeError) -> str:
    """Why a caption whose bytes are not UTF-8 is not used (its kind, then where it fails)."""
    return f"caption not UTF-8 ({error.reason} at byte {error.start})"


def image_ext(sample: dict[str, Any]) -> str | None:
    """The sample's image member, by ``IMAGE_EXTENSIONS`` order."""
    return next((e for e in IMAGE_EXTENSIONS if e in sample), None)


def iter_tar_samples(
    path: str, shard: ShardInfo | None = None, manifest: str = "the manifest"
) -> Iterator[dict[str, Any]]:
    """The samples of one tar, its members grouped by key (no decoding), by webdataset's own
    tar iterators: ``{"__key__", "__url__", ext: bytes, ...}`` with lower-case extensions. A
    remote shard is streamed (``data_pipelines.remote``: checked against the size and ETag
    ``shard`` recorded, transient failures retried); a read error is raised."""
    import webdataset as wds

    if is_remote(path):
        from .remote import remote_samples

        def fail(exn: Exception) -> bool:
            raise exn

        yield from remote_samples(path, fail, shard=shard, manifest=manifest)
        return
    with open(path, "rb") as stream:
        members = wds.tariterators.tar_file_iterator(stream)
        yield from wds.tariterators.group_by_keys({**m, "__url__": path} for m in members)


def write_split(
    out_dir: str | os.PathLike,
    samples: Iterable[RawSample | SkippedInput],
    *,
    shard_size: int,
    total: int | None = None,
    label_names: list[str] | None = None,
    meta: dict[str, Any] | None = None,
    desc: str = "writing shards",
    progress: bool = True,
    images_only: bool = False,
) -> ShardSet:
    """Write ``samples`` into shards under ``out_dir`` with a progress bar; return the ShardSet.

    A ``SkippedInput`` in the stream is counted in the manifest like any skipped sample.
    ``images_only``: captions are optional (vision-only data); samples without one have no
    ``.txt`` member.
    """
    from tqdm.auto import tqdm

    writer = ShardWriter(out_dir, shard_size, images_only=images_only)
    for s in tqdm(samples, total=total, desc=desc, unit="sample", disable=bar_disable(progress)):
        if isinstance(s, SkippedInput):
            writer.skip(s.reason, s.source)
        else:
            writer.write(s)
    shard_set = writer.finish(label_names=label_names, meta=meta)
    if writer.skipped:
        import logging

        logging.getLogger(__name__).warning(
            "%s: skipped %s (e.g. %s)",
            out_dir,
            writer.skipped,
            "; ".join(writer.skipped_examples[:3]),
        )
    return shard_set
