"""What each loader worker runs: stream its shards (webdataset's tar reader), shuffle in a
buffer, decode, and hand ``Chunk``s of ``chunk_size`` raw positions to the main process."""

from __future__ import annotations

import io
import json
import random
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import IterableDataset, get_worker_info

from ..images import to_rgb
from ..remote import Unreachable, remote_samples
from ..shards import DataError, ShardInfo, caption_not_utf8, image_ext
from ..urls import is_remote, public, redact
from .state import BadSample, Chunk, LoaderState, mix_seed

if TYPE_CHECKING:
    from .stream import ShardStream


class _ErrorLog:
    """A webdataset exception handler that records read errors instead of raising."""

    def __init__(self, on_error: str):
        self.on_error = on_error
        self.errors: list[BadSample] = []
        self.unreachable: set[str] = set()  # remote shards given up on (their count is moot)

    def __call__(self, exn: Exception) -> bool:
        if isinstance(exn, Unreachable):  # a remote shard, with its reason in words
            if self.on_error == "raise":
                raise DataError(str(exn)) from None
            self.errors.append(BadSample(exn.shard, "", f"unreachable shard ({exn.reason})"))
            self.unreachable.add(exn.shard)
            return True
        if self.on_error == "raise":
            raise DataError(f"cannot read shard data: {redact(str(exn))}") from exn
        self.errors.append(
            BadSample(_shard_of(exn), "", f"read error ({type(exn).__name__}: {redact(str(exn))})")
        )
        return True


def _shard_of(exn: Exception) -> str:
    for arg in getattr(exn, "args", ()):
        if isinstance(arg, str) and arg.endswith(".tar"):
            return arg
    text = str(exn)
    for token in text.replace("'", " ").replace('"', " ").split():
        if token.endswith(".tar"):
            return token
    return "?"


def _shard_samples(
    sh: ShardInfo, errors: _ErrorLog, shard_set, retries: int
) -> Iterator[dict[str, Any]]:
    """The samples of one shard (webdataset's tar reader), its sample count checked against
    the manifest once read to its end: a mismatch (a shard that yields nothing included) is
    a ``DataError`` under ``on_error=raise``, else a fault recorded like a bad sample.

    Shards indexed in place (``offset`` set) count raw samples; their usable ones get
    ``__index__ = offset + position among usable`` and the others (``unusable_reason``,
    counted at indexing) are left out here, before positions are given, so that resume
    positions do not depend on them. A remote shard (``data_pipelines.remote``) is checked
    against its size and ETag first and read with up to ``retries`` retries.
    """
    url, offset = sh.path, sh.offset
    expected = sh.num_raw if offset is not None else sh.num_samples
    n = k = 0
    if is_remote(url):
        raw = remote_samples(
            url, errors, shard=sh, manifest=shard_set.manifest or shard_set.root, retries=retries
        )
    else:
        raw = wds.tariterators.tarfile_samples(iter([{"url": url}]), handler=errors)
    for sample in raw:
        n += 1
        if offset is not None:
            if shard_set.unusable(sample) is not None:
                continue
            sample["__index__"] = offset + k
            k += 1
        yield sample
    usable = sh.num_samples if offset is not None else k
    if public(url) in errors.unreachable:
        return  # counted as unreachable, not again as short
    if n != expected or k != usable:
        msg = (
            f"manifest says {expected} samples, the shard holds {n}"
            if n != expected
            else f"manifest says {usable} usable samples, the shard holds {k}"
        )
        if errors.on_error == "raise":
            raise DataError(f"{url}: {msg}; rebuild the manifest or check the shard")
        errors.errors.append(BadSample(url, "", f"sample count ({msg})"))


def share_from_worker(tensors: list[torch.Tensor], who: str) -> None:
    """Move tensors a DataLoader worker returns to shared memory here, in the worker's own
    thread.

    PyTorch does it when its queue's feeder thread pickles them, and a failure there
    (``/dev/shm`` full: Docker gives containers 64 MB by default) is only printed: the batch
    is lost and the process that waits for it waits forever. Done here, the failure is
    raised, and the DataLoader hands it to that process. Tensors already in shared memory are
    not copied again when pickled."""
    try:
        for t in tensors:
            t.share_memory_()
    except RuntimeError as e:
        why = (str(e).strip().splitlines() or ["RuntimeError"])[0]
        raise DataError(
            f"{who} cannot hand its samples over through shared memory ({why}): /dev/shm is "
            "full or too small (in Docker, run with --shm-size=2g or more), or load in the "
            "main process (data.num_workers=0, or --num-workers 0 for clipfnd eval)"
        ) from e


class RankStream(IterableDataset):
    """The worker side: streams one rank's shards and yields decoded chunks."""

    def __init__(self, owner: ShardStream, epoch: int, rank: int, state: LoaderState):
        super().__init__()
        self.o = owner
        self.epoch = epoch
        self.rank = rank
        self.state = state

    # --- raw samples (no decoding) ------------------------------------------------------
    def _raw(self, worker: int, n_workers: int, errors: _ErrorLog) -> Iterator[dict[str, Any]]:
        o = self.o
        if o.resampled:
            shards = o.shard_set.shards
            weights = [sh.weight for sh in shards]
            rng = random.Random(mix_seed(o.seed, self.epoch, self.rank, worker, 1))

            def draws() -> Iterator[ShardInfo]:
                while True:
                    yield rng.choices(shards, weights)[0]

            mine: Iterator[ShardInfo] = draws()
        else:
            mine = iter(o.shards_for(self.epoch, self.rank)[worker::n_workers])

        def samples() -> Iterator[dict[str, Any]]:
            for sh in mine:
                yield from _shard_samples(sh, errors, o.shard_set, o.retries)

        stream = samples()
        if o.shuffle_buffer > 1:
            rng = random.Random(mix_seed(o.seed, self.epoch, self.rank, worker, 2))
            stream = wds.shuffle(bufsize=o.shuffle_buffer, initial=o.shuffle_buffer, rng=rng)(
                stream
            )
        yield from stream

    # --- decoding ---------------------------------------------------------------------
    def _decode(self, sample: dict[str, Any], worker: int, pos: int):
        """Return (image, caption, index, label) or a BadSample."""
        o = self.o
        url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
        ext = image_ext(sample)
        if ext is None:
            return BadSample(url, key, "no image in sample")
        caption = ""
        if o.tokenize is not None:  # image-only streams ignore captions
            try:
                caption = sample.get("txt", b"").decode("utf-8").strip()
            except UnicodeDecodeError as e:
                return BadSample(url, key, caption_not_utf8(e))
            if not caption:
                return BadSample(url, key, "empty caption")
        meta: dict[str, Any] = {}
        if "json" in sample:
            try:
                meta = json.loads(sample["json"])
            except (json.JSONDecodeError, UnicodeDecodeError):
                meta = None
            if not isinstance(meta, dict):
                return BadSample(url, key, "unreadable .json")
        index = sample.get("__index__", meta.get("index"))
        if index is None:
            try:
                index = int(key)
            except ValueError:
                return BadSample(url, key, "no dataset index (.json 'index' or integer key)")
        if not isinstance(index, int) or not 0 <= index < o.num_samples:
            return BadSample(url, key, f"dataset index {index} out of range [0, {o.num_samples})")
        label = o.shard_set.label_of(meta)
        if not sample[ext]:
            return BadSample(url, key, "zero-byte image")
        # The CPU generator only: ``torch.manual_seed`` would also queue a seed for every
        # accelerator backend not yet initialised, capturing a stack trace each time (about
        # 2 ms per sample, a sixth of a small run's time). The seeded draws may start before
        # decoding (``Uint8Transform.prepare``: the crop, which sets the JPEG's reduction).
        transform = o.image_transform
        prepare = getattr(transform, "prepare", None)
        gen = torch.random.default_generator
        saved = gen.get_state()
        try:
            gen.manual_seed(mix_seed(o.seed, self.epoch, self.rank, worker, pos, 3))
            try:
                with Image.open(io.BytesIO(sample[ext])) as im:
                    plan = prepare(im) if prepare is not None else None
                    image = to_rgb(im)
            except Exception as e:
                return BadSample(url, key, f"unreadable image ({type(e).__name__})")
            image = transform(image) if prepare is None else transform(image, plan)
        finally:
            gen.set_state(saved)
        return image, caption, index, label

    def _make_chunk(
        self, items: list, bad: list[BadSample], worker: int, start: int, end: int
    ) -> Chunk:
        chunk = self._assemble(items, bad, worker, start, end)
        if get_worker_info() is not None:
            if chunk.image is not None:
                share_from_worker([chunk.image], f"loader worker {worker}")
            chunk.for_transfer()
        return chunk

    def _assemble(
        self, items: list, bad: list[BadSample], worker: int, start: int, end: int
    ) -> Chunk:
        good = [it for it in items if it is not None]
        chunk = Chunk(
            worker, start, end, list(bad), torch.tensor([p for p, *_ in good], dtype=torch.long)
        )
        if good:
            chunk.image = torch.stack([g[1] for g in good])
            if self.o.tokenize is not None:
                chunk.text = self.o.tokenize([g[2] for g in good])
            chunk.index = torch.tensor([g[3] for g in good], dtype=torch.long)
            chunk.label = torch.tensor([g[4] for g in good], dtype=torch.long)
            chunk.where = [(g[5], g[6]) for g in good]
        return chunk

    def __iter__(self) -> Iterator[Chunk]:
        info = get_worker_info()
        slot, n_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        worker = (slot + self.state.next_worker) % n_workers
        skip = self.state.consumed[worker] if self.state.consumed else 0
        c = self.o.chunk_size
        errors = _ErrorLog(self.o.on_error)
        items: list = []
        bad: list[BadSample] = []
        start = None
        pos = -1
        for pos, sample in enumerate(self._raw(worker, n_workers, errors)):
            if pos < skip:
                errors.errors.clear()  # counted before the checkpoint
                continue  # fast-forward: raw bytes only, nothing decoded
            if start is None:
                start = pos
            out = self._decode(sample, worker, pos)
            if isinstance(out, BadSample):
                if self.o.on_error == "raise":
                    raise DataError(f"bad sample {out.key!r} in {out.shard}: {out.reason}")
                out.pos = pos
                bad.append(out)
            else:
                items.append((pos, *out, sample.get("__url__", "?"), sample.get("__key__", "?")))
            for e in errors.errors:
                e.pos = pos
            bad.extend(errors.errors)
            errors.errors.clear()
            if (pos + 1) % c == 0:
                yield self._make_chunk(items, bad, worker, start, pos + 1)
                items, bad, start = [], [], None
        for e in errors.errors:
            e.pos = pos
        bad.extend(errors.errors)
        if start is not None or bad:
            end = pos + 1 if start is not None else max(skip, 0)
            yield self._make_chunk(items, bad, worker, start if start is not None else end, end)
