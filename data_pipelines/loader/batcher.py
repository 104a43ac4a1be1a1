"""The main-process side of one epoch on one rank: worker ``Chunk``s cut into batches of
exactly ``batch_size / world``, repeats of a dataset index dropped, bad samples counted once,
and the position to resume from kept up to date."""

from __future__ import annotations

import dataclasses
import logging
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch.utils.data import DataLoader

from ..shards import DataError
from .context import worker_context
from .state import SAMPLE_FIELDS, BadSample, Chunk, LoaderState
from .worker import RankStream

if TYPE_CHECKING:
    from .stream import ShardStream

log = logging.getLogger("data_pipelines.loader")


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
        self.bad: Counter[tuple[str, str]] = Counter(state.bad)  # the epoch's, resumed ones too
        self.bad_examples: list[BadSample] = []
        self._seen = torch.zeros(owner.num_samples, dtype=torch.bool)
        if state.seen:
            seen = torch.tensor(state.seen, dtype=torch.long)
            if int(seen.max()) >= owner.num_samples:
                raise DataError(
                    f"loader state holds dataset index {int(seen.max())}, outside this data's "
                    f"[0, {owner.num_samples})"
                )
            self._seen[seen] = True
        self._pending: list[Chunk] = []  # chunks arrived (and marked seen) but not yet used
        self._n_workers = n_workers

    def state(self) -> LoaderState:
        """The position after the last batch handed out. Its ``seen`` holds the indices of the
        samples that batches used: those of chunks that arrived but wait unused are left out,
        since a resumed epoch reads them again."""
        seen = self._seen.clone()
        for chunk in self._pending:
            if chunk.index is not None:
                seen[chunk.index] = False
        return LoaderState(
            self.epoch,
            self._state.batches,
            list(self._state.consumed),
            self._state.next_worker,
            seen=torch.nonzero(seen).flatten().tolist(),
            bad=dict(self.bad),
        )

    @property
    def batches(self) -> int:
        """Batches handed out in this epoch so far (resumed ones included); ``state()``'s
        ``batches`` without building the whole state."""
        return self._state.batches

    def __len__(self) -> int:
        return self.steps - self._state.batches

    def _chunks(self) -> Iterator[Chunk]:
        ds = RankStream(self.o, self.epoch, self.rank, self._state)
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
        try:
            for chunk in loader:
                yield chunk.after_transfer()
        except DataError as e:  # raised in a worker: the DataLoader wraps it in its traceback
            raise DataError(worker_message(e)) from None

    def _drop_duplicates(self, chunk: Chunk) -> None:
        """Drop samples whose dataset index this rank already saw in this epoch.

        Two samples with one index would share one row of per-sample state; the second is
        treated as a bad sample (skipped and counted, or an error under ``on_error=raise``).
        """
        if chunk.index is None:
            return
        idx = chunk.index
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
            shard, key = chunk.where[i] if chunk.where else ("?", f"index {n}")
            msg = f"duplicate dataset index {n} (already used in this epoch)"
            if self.o.on_error == "raise":
                raise DataError(f"sample {key!r} in {shard}: {msg}")
            chunk.bad.append(BadSample(shard, key, msg, int(chunk.pos[i])))
        chunk.keep(~dup)

    def _note_bad(self, bad: list[BadSample]) -> None:
        """Count bad samples once the batches have consumed past them (so a resumed epoch,
        which fast-forwards over them without decoding, never counts one twice)."""
        for bs in bad:
            self.bad[(bs.shard, bs.reason.split(" (")[0])] += 1
            if len(self.bad_examples) < 50:
                self.bad_examples.append(bs)
                log.warning("skipped sample %r in %s: %s", bs.key, bs.shard, bs.reason)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        b = self.o.local_batch_size
        if self._state.batches >= self.steps:
            return
        self._pending = []  # chunks (or their unused tails), in order
        have = 0
        for chunk in self._chunks():
            self._drop_duplicates(chunk)
            self._pending.append(chunk)
            have += len(chunk)
            while have >= b:
                batch, self._pending = self._take(self._pending, b)
                have -= b
                self._state.batches += 1
                yield batch
                if self._state.batches >= self.steps:
                    return
        # The stream ran dry before `steps` batches: the caller sees fewer batches (the
        # training loop stops every rank together when any rank runs out). What is left was
        # read to the end, so its bad samples count too.
        for chunk in self._pending:
            self._note_bad(chunk.bad)
        self._pending = []

    def _take(self, pending: list[Chunk], b: int) -> tuple[dict[str, torch.Tensor], list[Chunk]]:
        """Cut the first ``b`` usable samples off ``pending``; update the resume state."""
        parts: dict[str, list[torch.Tensor]] = {k: [] for k in SAMPLE_FIELDS}
        need = b
        rest: list[Chunk] = []
        for i, chunk in enumerate(pending):
            if need == 0:
                rest = pending[i:]
                break
            w = chunk.worker
            n = len(chunk)
            if n <= need:
                for k in parts:
                    if n and getattr(chunk, k) is not None:
                        parts[k].append(getattr(chunk, k))
                need -= n
                self._note_bad(chunk.bad)
                self._state.consumed[w] = chunk.end
                self._state.next_worker = (w + 1) % self._n_workers
            else:
                for k in parts:
                    if getattr(chunk, k) is not None:
                        parts[k].append(getattr(chunk, k)[:need])
                last_pos = int(chunk.pos[need - 1])
                tail = dataclasses.replace(chunk)
                tail.keep(torch.arange(need, n))
                self._note_bad([bad for bad in chunk.bad if bad.pos <= last_pos])
                tail.bad = [bad for bad in chunk.bad if bad.pos > last_pos]
                tail.start = last_pos + 1
                self._state.consumed[w] = last_pos + 1
                self._state.next_worker = w
                need = 0
                rest = [tail] + pending[i + 1 :]
                break
        # image-only streams (no tokenizer) carry no ``text``
        batch = {k: _concat(v) for k, v in parts.items() if v}
        return batch, rest


def _concat(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat`` of CPU tensors, in this thread alone (numpy's copy). ``torch.cat`` of a
    batch's images runs on the intra-op thread pool, and while the loader workers keep the
    other cores busy its threads wait for a core: 26-36 ms for a 1.5 MB batch measured on
    2 cores with one busy worker, against under 1 ms with the cores free."""
    if len(parts) == 1:
        return parts[0]
    return torch.from_numpy(np.concatenate([p.numpy() for p in parts]))


def worker_message(e: Exception) -> str:
    """The message of an exception raised in a DataLoader worker, without the traceback
    PyTorch writes into it ("Caught DataError in DataLoader worker process 0. Original
    Traceback ...": the original message is its last line)."""
    text = str(e)
    if "Original Traceback" not in text:
        return text
    last = [line for line in text.strip().splitlines() if line.strip()][-1]
    head, sep, rest = last.partition(": ")
    return rest if sep and head.rsplit(".", 1)[-1] == type(e).__name__ else last
