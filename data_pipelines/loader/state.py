"""Positions and records of the loader: where a rank stands (``LoaderState``), what a worker
hands to the main process (``Chunk``), and a sample that could not be used (``BadSample``)."""

from __future__ import annotations

import base64
import zlib
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch


def mix_seed(*parts: int) -> int:
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
    chunk comes next in the round robin. ``seen`` holds the dataset indices the batches used
    so far in the epoch (a later repeat of one is dropped, which a resumed epoch must do
    too: with ``data.resampled`` repeats are common), and ``bad`` the bad samples counted so
    far, by ``(shard, reason)``, so that a resumed epoch reports the whole epoch's.
    """

    epoch: int
    batches: int = 0
    consumed: list[int] = field(default_factory=list)
    next_worker: int = 0
    seen: list[int] = field(default_factory=list)
    bad: dict[tuple[str, str], int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches": self.batches,
            "consumed": list(self.consumed),
            "next_worker": self.next_worker,
            "seen": encode_indices(self.seen),
            "bad": [[shard, why, n] for (shard, why), n in sorted(self.bad.items())],
        }

    @classmethod
    def from_dict(cls, d: Any) -> LoaderState:
        """The state ``to_dict`` wrote; anything else raises ``ValueError`` saying what is
        wrong (states written before ``seen`` and ``bad`` existed load with them empty)."""
        if not isinstance(d, dict):
            raise ValueError(f"a loader state is a JSON object, not {type(d).__name__}")
        unknown = sorted(set(d) - {"epoch", "batches", "consumed", "next_worker", "seen", "bad"})
        if unknown:
            raise ValueError(f"unknown loader state keys {unknown}")

        def count(key: str, value: Any) -> int:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError(f"loader state {key}={value!r} is not an integer >= 0")
            return value

        consumed = d.get("consumed", [])
        if not isinstance(consumed, list):
            raise ValueError(f"loader state consumed={consumed!r} is not a list")
        bad: dict[tuple[str, str], int] = {}
        rows = d.get("bad", [])
        if not isinstance(rows, list):
            raise ValueError("loader state bad is not a list")
        for row in rows:
            if not (
                isinstance(row, list) and len(row) == 3 and all(isinstance(x, str) for x in row[:2])
            ):
                raise ValueError(f"loader state bad entry {row!r} is not [shard, reason, count]")
            bad[(row[0], row[1])] = count("bad count", row[2])
        state = cls(
            epoch=count("epoch", d.get("epoch")),
            batches=count("batches", d.get("batches", 0)),
            consumed=[count("consumed", c) for c in consumed],
            next_worker=count("next_worker", d.get("next_worker", 0)),
            seen=decode_indices(d.get("seen")),
            bad=bad,
        )
        if state.consumed and state.next_worker >= len(state.consumed):
            raise ValueError(
                f"loader state next_worker={state.next_worker} with {len(state.consumed)} workers"
            )
        return state


def encode_indices(indices: list[int]) -> dict[str, Any]:
    """Dataset indices as JSON, compactly: sorted, as int64 gaps, zlib-compressed, base64
    (a few bytes per index where a list of numbers takes about eight)."""
    values = np.unique(np.asarray(indices, dtype=np.int64))
    gaps = np.diff(values, prepend=np.int64(0)).astype("<i8")
    data = base64.b64encode(zlib.compress(gaps.tobytes(), 6)).decode("ascii")
    return {"count": int(len(values)), "gaps_i64_zlib_b64": data}


def decode_indices(obj: Any) -> list[int]:
    """The indices ``encode_indices`` wrote (None: none); ``ValueError`` for anything else."""
    if obj is None:
        return []
    try:
        raw = zlib.decompress(base64.b64decode(obj["gaps_i64_zlib_b64"], validate=True))
        values = np.cumsum(np.frombuffer(raw, dtype="<i8"))
        ok = len(values) == obj["count"] and (len(values) == 0 or int(values[0]) >= 0)
        ok = ok and bool(np.all(np.diff(values) > 0))
    except (KeyError, TypeError, ValueError, zlib.error) as e:
        raise ValueError(f"loader state seen is not an encoded index list ({e})") from e
    if not ok:
        raise ValueError("loader state seen does not decode to its count of distinct indices")
    return values.tolist()


@dataclass
class BadSample:
    shard: str
    key: str
    reason: str
    pos: int = -1  # raw position in its worker's stream (counted once consumed past)


SAMPLE_FIELDS = ("image", "text", "index", "label")


@dataclass
class Chunk:
    """Raw positions ``[start, end)`` of one worker's stream, decoded: the usable samples in
    raw order (``pos``, and ``image``/``text``/``index``/``label``, None when there are none)
    and the samples that could not be used (``bad``)."""

    worker: int
    start: int
    end: int
    bad: list[BadSample]
    pos: torch.Tensor  # [n] raw positions of the usable samples
    image: torch.Tensor | None = None  # [n, C, H, W]
    text: torch.Tensor | None = None  # [n, context]
    index: torch.Tensor | None = None  # [n] dataset indices
    label: torch.Tensor | None = None  # [n] labels (-1: none)
    where: list[tuple[str, str]] = field(default_factory=list)  # [n] (shard, key), for messages

    def __len__(self) -> int:
        return 0 if self.index is None else len(self.index)

    # A tensor a worker hands over goes through shared memory, one file descriptor passed
    # over a socket per tensor (about a millisecond each here); the small fields travel by
    # value as numpy arrays instead, and only the images through shared memory.
    BY_VALUE = ("pos", "text", "index", "label")

    def for_transfer(self) -> Chunk:
        """(Worker.) The small fields as numpy arrays, pickled by value."""
        for f in self.BY_VALUE:
            value = getattr(self, f)
            if isinstance(value, torch.Tensor):
                setattr(self, f, value.numpy())
        return self

    def after_transfer(self) -> Chunk:
        """(Main process.) The small fields as tensors again (no copy)."""
        for f in self.BY_VALUE:
            value = getattr(self, f)
            if isinstance(value, np.ndarray):
                setattr(self, f, torch.from_numpy(value))
        return self

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (bool mask or indices) of the usable samples."""
        self.pos = self.pos[rows]
        if self.where:
            kept = torch.nonzero(rows).flatten() if rows.dtype == torch.bool else rows
            self.where = [self.where[i] for i in kept.tolist()]
        for f in SAMPLE_FIELDS:
            value = getattr(self, f)
            setattr(self, f, None if value is None else value[rows])
        if self.index is not None and len(self.index) == 0:
            for f in SAMPLE_FIELDS:
                setattr(self, f, None)
