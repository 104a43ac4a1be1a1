"""Per-sample state replicated on every process against sharded over them (``fnd.state``):
the time of the objective's per-step work on the tables, and the memory each process holds.

    python benchmarks/sharded_state.py [--rows 10000000] [--batch 256] [--steps 30] [--rounds 3]

Two CPU processes in a gloo group run FastCLIP-v3 + GloFND's objective (12 per-sample
tables: GloFND's threshold, moments and count, FastCLIP's ``u`` and visits, per modality)
on random features of a global batch of ``--batch`` drawn from ``--rows`` samples: the
forward with the threshold lookups, the flags and the ``u`` updates, and ``commit`` (the new
rows written). No backward: the model is not what differs. Rounds alternate the two layouts;
each prints the median step time. Then the table memory per process, measured here and
computed for 10^8 and LAION-400M's 4x10^8 rows on 8 processes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F

OVERRIDES = [
    "data.train=unused",
    "loss.name=fastclip_v3",
    "fnd.detector=glofnd",
    "fnd.start_mask=0",
    "loss.gamma_decay_epochs=2",
]


def _worker(rank, world, init_file, a, state, out):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    from clipfnd.config import load_config
    from clipfnd.state import ShardedTables, StateTables
    from clipfnd.train.objective import ClipObjective

    cfg = load_config(None, [*OVERRIDES, f"fnd.state={state}"])
    if state == "sharded":
        tables = ShardedTables(a.rows, rank=rank, world=world)
    else:
        tables = StateTables(a.rows)
    obj = ClipObjective(cfg, tables, has_labels=False)
    local_bytes = sum(tables.local(n).numel() * 4 for n in tables.names())
    b = a.batch // world
    times = []
    for step in range(a.steps):
        g = torch.Generator().manual_seed(step)
        idx = torch.randperm(a.rows, generator=g)[: a.batch][rank * b : (rank + 1) * b]
        img = F.normalize(torch.randn(b, 64, generator=g), dim=1)
        txt = F.normalize(torch.randn(b, 64, generator=g), dim=1)
        dist.barrier()
        t0 = time.perf_counter()
        res = obj(img, txt, torch.tensor(1 / 0.07), idx, torch.full((b,), -1), epoch=0)
        obj.commit(res)
        dist.barrier()
        times.append(time.perf_counter() - t0)
    if rank == 0:
        out.put((statistics.median(times[len(times) // 5 :]), local_bytes))
    dist.destroy_process_group()


def run(a, state: str) -> tuple[float, int]:
    ctx = mp.get_context("spawn")
    out = ctx.SimpleQueue()
    with tempfile.TemporaryDirectory() as d:
        mp.start_processes(
            _worker,
            args=(2, os.path.join(d, "rdv"), a, state, out),
            nprocs=2,
            start_method="spawn",
        )
    return out.get()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rows", type=int, default=10_000_000)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--rounds", type=int, default=3)
    a = p.parse_args()
    times: dict[str, list[float]] = {"replicated": [], "sharded": []}
    mem: dict[str, int] = {}
    for r in range(a.rounds):
        order = ["replicated", "sharded"] if r % 2 == 0 else ["sharded", "replicated"]
        for state in order:
            t, local = run(a, state)
            times[state].append(t)
            mem[state] = local
            print(f"round {r}: {state}: {t * 1e3:.2f} ms/step", flush=True)
    rep, sh = statistics.median(times["replicated"]), statistics.median(times["sharded"])
    print(f"\nN = {a.rows:,}, global batch {a.batch}, 2 processes (gloo, CPU), 12 tables")
    print(f"{'layout':<12}{'ms/step':>10}{'tables per process':>22}")
    for state, t in (("replicated", rep), ("sharded", sh)):
        print(f"{state:<12}{t * 1e3:>10.2f}{mem[state] / 2**20:>18.0f} MiB")
    print(f"sharded / replicated step time: {sh / rep:.2f}x")
    per_row = 12 * 4
    for n, w in ((10**8, 2), (10**8, 8), (4 * 10**8, 8)):
        print(
            f"N = {n:.0e}, {w} processes: replicated {n * per_row / 2**30:.1f} GiB per process, "
            f"sharded {-(-n // w) * per_row / 2**30:.2f} GiB"
        )


if __name__ == "__main__":
    main()
