"""Positions and records of the loader: where a rank stands (``LoaderState``), what a worker
hands to the main process (``Chunk``), and a sample that could not be used (``BadSample``)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
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

    def __len__(self) -> int:
        return 0 if self.index is None else len(self.index)

    def keep(self, rows: torch.Tensor) -> None:
        """Keep only ``rows`` (bool mask or indices) of the usable samples."""
        self.pos = self.pos[rows]
        for f in SAMPLE_FIELDS:
            value = getattr(self, f)
            setattr(self, f, None if value is None else value[rows])
        if self.index is not None and len(self.index) == 0:
            for f in SAMPLE_FIELDS:
                setattr(self, f, None)
