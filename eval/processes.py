"""The processes an evaluation runs on, and gathering their results by sample key.

Launched plainly, evaluation is one process. Under ``accelerate launch`` (or ``torchrun``),
Accelerate's ``PartialState`` joins the process group; each process then encodes its slice of
the data, and ``clipfnd.distributed.gather_uneven`` / ``gather_objects`` put every process's
rows together (unequal counts allowed) so that callers can sort them by sample key and drop
duplicates. Accelerate's ``gather_for_metrics`` is not used: it drops only the padding of
DataLoaders Accelerate prepared itself, and evaluation splits its data by shard (uneven counts
per process) and removes duplicates by item key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

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
    distributed.shutdown()
