"""Run a function on real gloo process groups of CPU processes (spawned), collect results.

    results = run_group(fn, world=2, *args)   # fn(rank, world, *args) -> picklable

Each process joins a fresh gloo group (file rendezvous), runs ``fn``, and its return value
comes back in rank order, through a file in a private temporary folder read with
``weights_only=True`` (tensors, numbers, strings, ``None`` and lists, tuples and dicts of them:
nothing is unpickled unrestricted). A failure in any process fails the caller with its
traceback.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _entry(
    rank: int, fn, world: int, init_file: str, out_dir: str, args: tuple, hard_exit: bool
) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        result = fn(rank, world, *args)
        torch.save({"ok": result}, Path(out_dir) / f"{rank}.pt")
    except BaseException:
        torch.save({"error": traceback.format_exc()}, Path(out_dir) / f"{rank}.pt")
        raise
    finally:
        dist.destroy_process_group()
    if hard_exit:  # the result is written: skip the interpreter's teardown
        sys.stdout.flush()
        os._exit(0)


def run_group(fn, world: int, *args, hard_exit: bool = False):
    """``hard_exit``: end each process with ``os._exit`` once its result is written (a
    benchmark whose processes can abort in the interpreter's teardown; tests keep it off, so
    that such an abort fails them)."""
    with tempfile.TemporaryDirectory() as d:
        init_file = os.path.join(d, "rendezvous")
        out_dir = os.path.join(d, "out")
        os.makedirs(out_dir)
        try:
            mp.start_processes(
                _entry,
                args=(fn, world, init_file, out_dir, args, hard_exit),
                nprocs=world,
                start_method="spawn",
                join=True,
            )
        except Exception as e:
            errors = []
            for r in range(world):
                p = Path(out_dir) / f"{r}.pt"
                if p.exists():
                    got = torch.load(p, weights_only=True)
                    if "error" in got:
                        errors.append(f"rank {r}:\n{got['error']}")
            raise AssertionError("\n".join(errors) or str(e)) from e
        return [
            torch.load(Path(out_dir) / f"{r}.pt", weights_only=True)["ok"] for r in range(world)
        ]
