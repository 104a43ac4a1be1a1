"""The processes an evaluation runs on, and gathering their results by sample key.

Launched plainly, evaluation is one process. Under ``accelerate launch`` (or ``torchrun``),
Accelerate's ``PartialState`` joins the process group; each process then encodes its slice of
the data, and :func:`gather_rows` / :func:`gather_list` put every process's rows together
(unequal counts allowed) so that callers can sort them by sample key and drop duplicates.
Collectives go through :mod:`clipfnd.distributed`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from clipfnd import distributed


@dataclass(frozen=True)
class Processes:
    rank: int
    world: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def setup_processes(device: str | None = None) -> Processes:
    """This process's rank, the number of processes and the device to compute on."""
    launched = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if launched or distributed.is_distributed():
        from accelerate import PartialState

        cpu = device == "cpu" or not torch.cuda.is_available()
        state = PartialState(cpu=cpu)
        return Processes(state.process_index, state.num_processes, torch.device(state.device))
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    return Processes(0, 1, torch.device(device))


def finish_processes() -> None:
    """Leave the process group (several gloo ranks may abort at exit otherwise)."""
    if distributed.is_distributed():
        from accelerate import PartialState

        PartialState().wait_for_everyone()
        PartialState().destroy_process_group()


def gather_rows(x: torch.Tensor) -> torch.Tensor:
    """Every process's rows of ``x`` (dim 0), concatenated in rank order; counts may differ."""
    if not distributed.is_distributed():
        return x
    count = torch.tensor([x.shape[0]], dtype=torch.long, device=x.device)
    counts = distributed.gather(count).tolist()
    longest = max(counts)
    padded = x.new_zeros((longest, *x.shape[1:]))
    padded[: x.shape[0]] = x
    everything = distributed.gather(padded)
    return torch.cat([everything[r * longest : r * longest + n] for r, n in enumerate(counts)])


def gather_list(items: list[Any]) -> list[Any]:
    """Every process's list of small picklable items, concatenated in rank order."""
    if not distributed.is_distributed():
        return items
    out: list[Any] = []
    for src in range(distributed.world_size()):
        out.extend(distributed.broadcast_object(items if distributed.rank() == src else None, src))
    return out
