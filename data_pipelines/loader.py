"""Streaming shards back as batches: exact, equal on every rank, resumable mid-epoch.

How an epoch is laid out
------------------------
1. All ranks shuffle the shard list with the same RNG seeded by ``(seed, epoch)``, and rank
   ``r`` of ``world`` takes ``shards[r::world]`` (what ``webdataset.split_by_node`` does, with
   rank and world passed in rather than read from globals).
2. Worker ``w`` of ``W`` on that rank takes ``rank_shards[w::W]`` (what
   ``webdataset.split_by_worker`` does). The split is done here so that a resumed epoch can
   give each worker its original role (see ``LoaderState``).
3. Each worker streams its shards (webdataset's tar reader), shuffles samples in a buffer
   with an RNG seeded by ``(seed, epoch, rank, worker)``, numbers them (raw positions), and
   decodes them in **chunks** of ``chunk_size`` raw positions. A sample that cannot be used
   (unreadable image, empty caption, index out of range) leaves a gap in its chunk and is
   counted, so chunk boundaries never depend on the data's faults.
4. The main process receives chunks round-robin from the workers (PyTorch's in-order
   ``DataLoader``) and cuts them into batches of exactly ``batch_size / world``.
5. Every rank stops after ``steps_per_epoch(epoch)`` batches: the smallest number that every
   rank can fill, computed from the manifest's per-shard counts, so no rank waits for
   another at the end of an epoch. Samples past that point in the larger ranks are dropped
   for this epoch (how many is logged); with equal shards and a sample count divisible by
   the global batch, every sample is seen exactly once per epoch.

Augmentation randomness is seeded per sample from ``(seed, epoch, rank, worker, position)``,
so a batch is the same whatever the number of workers restarted in between.
"""

from __future__ import annotations

import io
import json
import logging
import multiprocessing
import random
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from .shards import IMAGE_EXTENSIONS, DataError, ShardInfo, ShardSet

log = logging.getLogger(__name__)

ON_ERROR = ("skip", "raise")


def _seed(*parts: int) -> int:
    """A 63-bit seed mixed from integers (stable across processes and Python versions)."""
    return int(
        np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(2, np.uint64)[0]
        >> 1
    )


@dataclass
class LoaderState:
    """Where a rank stands inside an epoch; enough to continue it exactly.

    ``consumed[w]`` is the number of raw positions of worker ``w``'s stream that batches
    already used (bad samples among them included); ``next_worker`` is the worker whose
    chunk comes next in the round robin.
    """

    epoch: int
    batches: int = 0
    consumed: list[int] = field(default_factory=list)
    next_worker: int = 0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LoaderState:
        return cls(**d)


@dataclass
class BadSample:
    shard: str
    key: str
    reason: str
    pos: int = -1  # raw position in its worker's stream (counted once consumed past)


# Modules every loader worker needs, imported once in the fork server instead of per worker.
WORKER_PRELOAD = [
    "torch",
    "torchvision",
    "PIL.Image",
    "webdataset",
    "open_clip",
    "data_pipelines.loader",
]


def worker_context() -> multiprocessing.context.BaseContext:
    """Where loader workers start: a fork server, not a fork of the training process.

    A training process has threads (gloo's, TensorBoard's writer, the progress bar's
    monitor); forking it can leave a child holding a lock that no thread will release, and
    the worker hangs at start. The fork server is a fresh single-threaded process (started
    once, with ``WORKER_PRELOAD`` imported) that forks the workers instead. Where there is
    no fork server (Windows), workers are spawned.
    """
    if "forkserver" not in multiprocessing.get_all_start_methods():
        return multiprocessing.get_context("spawn")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(WORKER_PRELOAD)
    return ctx


class _ErrorLog:
    """A webdataset exception handler that records read errors instead of raising."""

    def __init__(self, on_error: str):
        self.on_error = on_error
        self.errors: list[BadSample] = []

    def __call__(self, exn: Exception) -> bool:
        if self.on_error == "raise":
            raise DataError(f"cannot read shard data: {exn}") from exn
        self.errors.append(
            BadSample(_shard_of(exn), "", f"read error ({type(exn).__name__}: {exn})")
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


class _RankStream(IterableDataset):
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
            rng = random.Random(_seed(o.seed, self.epoch, self.rank, worker, 1))

            def urls() -> Iterator[dict[str, str]]:
                while True:
                    yield {"url": shards[rng.randrange(len(shards))].path}

            src = urls()
        else:
            mine = o.shards_for(self.epoch, self.rank)[worker::n_workers]
            src = iter([{"url": s.path} for s in mine])
        samples = wds.tariterators.tarfile_samples(src, handler=errors)
        if o.shuffle_buffer > 1:
            rng = random.Random(_seed(o.seed, self.epoch, self.rank, worker, 2))
            samples = wds.shuffle(bufsize=o.shuffle_buffer, initial=o.shuffle_buffer, rng=rng)(
                iter(samples)
            )
        yield from samples

    # --- decoding ---------------------------------------------------------------------
    def _decode(self, sample: dict[str, Any], worker: int, pos: int):
        """Return (image, caption, index, label) or a BadSample."""
        o = self.o
        url, key = sample.get("__url__", "?"), sample.get("__key__", "?")
        ext = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
        if ext is None:
            return BadSample(url, key, "no image in sample")
        raw_caption = sample.get("txt")
        caption = raw_caption.decode("utf-8", errors="replace").strip() if raw_caption else ""
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
        index = meta.get("index")
        if index is None:
            try:
                index = int(key)
            except ValueError:
                return BadSample(url, key, "no dataset index (.json 'index' or integer key)")
        if not isinstance(index, int) or not 0 <= index < o.num_samples:
            return BadSample(url, key, f"dataset index {index} out of range [0, {o.num_samples})")
        label = meta.get("label", -1)
        label = label if isinstance(label, int) else -1
        if not sample[ext]:
            return BadSample(url, key, "zero-byte image")
        try:
            with Image.open(io.BytesIO(sample[ext])) as im:
                image = im.convert("RGB")
        except Exception as e:
            return BadSample(url, key, f"unreadable image ({type(e).__name__})")
        saved = torch.get_rng_state()
        try:
            torch.manual_seed(_seed(o.seed, self.epoch, self.rank, worker, pos, 3))
            image = o.image_transform(image)
        finally:
            torch.set_rng_state(saved)
        return image, caption, index, label

    def _make_chunk(
        self, items: list, bad: list[BadSample], worker: int, start: int, end: int
    ) -> dict[str, Any]:
        good = [it for it in items if it is not None]
        chunk: dict[str, Any] = {
            "worker": worker,
            "start": start,
            "end": end,
            "bad": [asdict(b) for b in bad],
            "pos": torch.tensor([p for p, *_ in good], dtype=torch.long),
        }
        if good:
            chunk["image"] = torch.stack([g[1] for g in good])
            chunk["text"] = self.o.tokenize([g[2] for g in good])
            chunk["index"] = torch.tensor([g[3] for g in good], dtype=torch.long)
            chunk["label"] = torch.tensor([g[4] for g in good], dtype=torch.long)
        return chunk

    def __iter__(self) -> Iterator[dict[str, Any]]:
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
                items.append((pos, *out))
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


class EpochIterator:
    """Main-process side of one epoch on one rank: cuts worker chunks into batches.

    Iterate it for batches (dicts of ``image``, ``text``, ``index``, ``label`` tensors);
    ``state()`` gives the position to resume from, ``bad`` the samples skipped so far.
    """

    def __init__(self, owner: ShardStream, epoch: int, rank: int, state: LoaderState | None):
        self.o = owner
        self.epoch = epoch
        self.rank = rank
        n_workers = max(owner.num_workers, 1)
        if state is None:
            state = LoaderState(epoch=epoch, consumed=[0] * n_workers)
        if state.epoch != epoch or len(state.consumed) != n_workers:
            raise DataError(
                f"loader state is for epoch {state.epoch} with {len(state.consumed)} workers; "
                f"this stream is epoch {epoch} with {n_workers} workers (data.num_workers must "
                "not change when resuming mid-epoch)"
            )
        self._state = LoaderState(epoch, state.batches, list(state.consumed), state.next_worker)
        self.steps = owner.steps_per_epoch(epoch)
        self.bad: Counter[tuple[str, str]] = Counter()
        self.bad_examples: list[BadSample] = []
        self._seen = torch.zeros(owner.num_samples, dtype=torch.bool)
        self._n_workers = n_workers

    def state(self) -> LoaderState:
        return LoaderState(
            self.epoch, self._state.batches, list(self._state.consumed), self._state.next_worker
        )

    def __len__(self) -> int:
        return self.steps - self._state.batches

    def _chunks(self) -> Iterator[dict[str, Any]]:
        ds = _RankStream(self.o, self.epoch, self.rank, self._state)
        if self.o.num_workers == 0:
            yield from ds
            return
        loader = DataLoader(
            ds,
            batch_size=None,
            num_workers=self.o.num_workers,
            persistent_workers=False,
            prefetch_factor=self.o.prefetch_factor,
            multiprocessing_context=worker_context(),
        )
        yield from loader

    def _drop_duplicates(self, chunk: dict[str, Any]) -> None:
        """Drop samples whose dataset index this rank already saw in this epoch.

        Two samples with one index would share one row of per-sample state; the second is
        treated as a bad sample (skipped and counted, or an error under ``on_error=raise``).
        """
        if "image" not in chunk:
            return
        idx = chunk["index"]
        dup = self._seen[idx].clone()
        # repeats inside the chunk itself: keep the first occurrence only
        order = torch.argsort(idx, stable=True)
        sorted_idx = idx[order]
        repeat = torch.zeros_like(dup)
        repeat[order[1:]] = sorted_idx[1:] == sorted_idx[:-1]
        dup |= repeat
        self._seen[idx] = True
        if not bool(dup.any()):
            return
        for i in torch.nonzero(dup).flatten().tolist():
            n = int(idx[i])
            msg = f"duplicate dataset index {n}"
            if self.o.on_error == "raise":
                raise DataError(
                    f"{msg} (worker {chunk['worker']}, raw position {int(chunk['pos'][i])})"
                )
            chunk["bad"].append(asdict(BadSample("?", f"index {n}", msg, int(chunk["pos"][i]))))
        keep = ~dup
        for k in ("image", "text", "index", "label", "pos"):
            chunk[k] = chunk[k][keep]
        if not bool(keep.any()):
            for k in ("image", "text", "index", "label"):
                del chunk[k]

    def _note_bad(self, bad: list[dict[str, Any]]) -> None:
        """Count bad samples once the batches have consumed past them (so a resumed epoch,
        which fast-forwards over them without decoding, never counts one twice)."""
        for b in bad:
            bs = BadSample(**b)
            self.bad[(bs.shard, bs.reason.split(" (")[0])] += 1
            if len(self.bad_examples) < 50:
                self.bad_examples.append(bs)
                log.warning("skipped sample %r in %s: %s", bs.key, bs.shard, bs.reason)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        b = self.o.local_batch_size
        if self._state.batches >= self.steps:
            return
        pending: list[dict[str, Any]] = []  # chunks (or their unused tails), in order
        have = 0
        for chunk in self._chunks():
            self._drop_duplicates(chunk)
            pending.append(chunk)
            have += len(chunk["index"]) if "image" in chunk else 0
            while have >= b:
                batch, pending = self._take(pending, b)
                have -= b
                self._state.batches += 1
                yield batch
                if self._state.batches >= self.steps:
                    return
        # The stream ran dry before `steps` batches: the caller sees fewer batches (the
        # training loop stops every rank together when any rank runs out). What is left was
        # read to the end, so its bad samples count too.
        for chunk in pending:
            self._note_bad(chunk["bad"])

    def _take(self, pending: list[dict[str, Any]], b: int):
        """Cut the first ``b`` usable samples off ``pending``; update the resume state."""
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in ("image", "text", "index", "label")}
        need = b
        rest: list[dict[str, Any]] = []
        for i, chunk in enumerate(pending):
            if need == 0:
                rest = pending[i:]
                break
            w = chunk["worker"]
            n = len(chunk["index"]) if "image" in chunk else 0
            if n <= need:
                for k in parts:
                    if n:
                        parts[k].append(chunk[k])
                need -= n
                self._note_bad(chunk["bad"])
                self._state.consumed[w] = chunk["end"]
                self._state.next_worker = (w + 1) % self._n_workers
            else:
                for k in parts:
                    parts[k].append(chunk[k][:need])
                last_pos = int(chunk["pos"][need - 1])
                tail = dict(chunk)
                for k in ("image", "text", "index", "label", "pos"):
                    tail[k] = chunk[k][need:]
                self._note_bad([b for b in chunk["bad"] if b["pos"] <= last_pos])
                tail["bad"] = [b for b in chunk["bad"] if b["pos"] > last_pos]
                tail["start"] = last_pos + 1
                self._state.consumed[w] = last_pos + 1
                self._state.next_worker = w
                need = 0
                rest = [tail] + pending[i + 1 :]
                break
        batch = {k: torch.cat(v) for k, v in parts.items()}
        return batch, rest


class ShardStream:
    """Batches from a ShardSet for one rank, epoch after epoch.

    Args:
        shard_set: the split to read (``load_shard_set``).
        global_batch_size: samples per step over all ranks (``B``); must divide by ``world``.
        rank, world: this process's place in the group (1 process: 0, 1).
        image_transform: PIL image -> tensor (e.g. open_clip's preprocess).
        tokenize: list of captions -> LongTensor ``[n, context_length]``.
        num_workers: DataLoader worker processes per rank (0: decode in this process).
        seed: shard order, sample shuffle and augmentation all derive from it and the epoch.
        shuffle_buffer: samples held for shuffling in each worker (<= 1: no shuffling).
        chunk_size: raw samples per worker chunk (a unit of transfer to the main process).
        on_error: ``skip`` bad samples (counted per shard) or ``raise`` at the first one.
        resampled: draw shards with replacement (an endless stream) instead of splitting them.
        samples_per_epoch: with ``resampled``, the length of an epoch (default: the dataset size).
    """

    def __init__(
        self,
        shard_set: ShardSet,
        *,
        global_batch_size: int,
        rank: int = 0,
        world: int = 1,
        image_transform: Callable[[Image.Image], torch.Tensor],
        tokenize: Callable[[list[str]], torch.Tensor],
        num_workers: int = 2,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        chunk_size: int = 32,
        on_error: str = "skip",
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        prefetch_factor: int = 4,
    ):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if global_batch_size % world:
            raise ValueError(f"batch size {global_batch_size} does not divide by {world} processes")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside [0, {world})")
        self.shard_set = shard_set
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world
        self.rank, self.world = rank, world
        self.image_transform = image_transform
        self.tokenize = tokenize
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.chunk_size = max(1, chunk_size)
        self.on_error = on_error
        self.resampled = resampled
        self.samples_per_epoch = samples_per_epoch or shard_set.num_samples
        self.prefetch_factor = prefetch_factor
        self.num_samples = shard_set.num_samples
        n = shard_set.num_shards
        if not resampled and n < world:
            raise DataError(
                f"{shard_set.root} has {n} shard(s) but {world} processes read it: every process "
                f"needs at least one shard. Write more, smaller shards (clipfnd data ... "
                f"--shard-size {max(1, shard_set.num_samples // (world * max(num_workers, 1)))})"
            )
        per_rank = n if resampled else n // world
        if num_workers > per_rank:
            log.warning(
                "%d shard(s) per process cannot feed %d workers each; using %d workers",
                per_rank,
                num_workers,
                per_rank,
            )
            num_workers = per_rank
        self.num_workers = num_workers
        if self.steps_per_epoch(0) < 1:
            raise DataError(
                f"{shard_set.root}: {shard_set.num_samples} samples cannot fill one batch of "
                f"{global_batch_size} per step on every process; lower data.batch_size"
            )

    def shards_for(self, epoch: int, rank: int) -> list[ShardInfo]:
        """The shards rank ``rank`` reads in ``epoch`` (same answer on every rank)."""
        order = np.random.default_rng(_seed(self.seed, epoch, 0)).permutation(
            self.shard_set.num_shards
        )
        shards = [self.shard_set.shards[i] for i in order]
        return shards[rank :: self.world]

    def steps_per_epoch(self, epoch: int) -> int:
        if self.resampled:
            return self.samples_per_epoch // self.global_batch_size
        counts = [sum(s.num_samples for s in self.shards_for(epoch, r)) for r in range(self.world)]
        return min(counts) // self.local_batch_size

    def dropped_in_epoch(self, epoch: int) -> int:
        """Samples past the last full step of every rank (not seen in this epoch)."""
        if self.resampled:
            return 0
        return self.num_samples - self.steps_per_epoch(epoch) * self.global_batch_size

    def epoch(self, epoch: int, state: LoaderState | None = None) -> EpochIterator:
        return EpochIterator(self, epoch, self.rank, state)
