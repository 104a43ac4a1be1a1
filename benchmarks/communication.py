"""What one training step's loss sends between processes: clipfnd's CLIP, GloFND and
FastCLIP-v3 beside open_clip's ``ClipLoss(gather_with_grad=True)``, on real gloo groups of CPU
processes.

    python benchmarks/communication.py [--worlds 2 4] [--local-batch 64 256] [--dim 512]
                                       [--repeats 10] [--quick]

For each setting, every process holds ``b`` image and ``b`` text features ``[b, d]`` (leaves
with gradients, as the towers' outputs are) and a learned temperature, computes its loss and
runs the backward, ``--repeats`` times. Counted: every collective the step calls
(``torch.distributed`` wrapped where the step calls it), and the bytes each process sends in
it at the ring algorithms' minimum (all-gather and all-to-all: the ``W - 1`` parts for the
others; all-reduce: ``2 (W - 1) / W`` of the tensor). The backward of a gather with
gradients is a reduce-scatter (NCCL) or, on gloo, an all-to-all made of ``W`` scatters. Timed: the median of the step (forward
and backward of the loss alone, one thread a process). What grows with what is printed beside
the counts: features are ``2 (W - 1) b d`` floats each way, and everything else is per sample
or per step. For scale, the gradient all-reduce of data-parallel training sends
``2 (W - 1) / W`` of the parameters every step (ViT-B-32: 151 M parameters, 866 MiB at
``W = 4``), whatever the batch.

On a 2-core machine four processes share two cores: compare times within a world size.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SETTINGS = {
    "open_clip ClipLoss(gather_with_grad)": None,
    "open_clip ClipLoss(gather_with_grad, local_loss)": None,
    "clipfnd clip": {},
    "clipfnd clip + glofnd": {"fnd.detector": "glofnd", "fnd.start_mask": 0},
    "clipfnd fastclip_v3 + glofnd": {
        "loss.name": "fastclip_v3",
        "fnd.detector": "glofnd",
        "fnd.start_mask": 0,
    },
}


class Tally:
    """Wraps ``torch.distributed``'s collectives to count calls and bytes sent."""

    NAMES = ("all_gather", "all_to_all", "reduce_scatter", "scatter", "all_reduce", "broadcast")

    def __init__(self) -> None:
        import torch.distributed as dist

        self.dist = dist
        self.calls: dict[str, int] = {}
        self.bytes = 0
        self.on = False
        self._orig = {n: getattr(dist, n) for n in self.NAMES}
        for n in self.NAMES:
            setattr(dist, n, self._wrap(n))

    def _wrap(self, name):
        orig = self._orig[name]

        def counted(*args, **kw):
            if self.on:
                w = self.dist.get_world_size()
                self.calls[name] = self.calls.get(name, 0) + 1
                self.bytes += self._sent(name, args, w)
            return orig(*args, **kw)

        return counted

    @staticmethod
    def _size(t) -> int:
        return t.numel() * t.element_size()

    def _sent(self, name: str, args: tuple, w: int) -> int:
        if name == "all_gather":  # (outputs, input)
            return (w - 1) * self._size(args[1])
        if name == "all_to_all":  # (outputs, inputs): every part but one's own
            return sum(self._size(t) for t in args[1]) * (w - 1) // w
        if name == "reduce_scatter":  # (output, inputs)
            return sum(self._size(t) for t in args[1]) * (w - 1) // w
        if name == "scatter":  # (output, inputs on the source, None elsewhere, source)
            parts = args[1] if len(args) > 1 else None
            return 0 if parts is None else sum(self._size(t) for t in parts) * (w - 1) // w
        if name == "all_reduce":
            return 2 * (w - 1) * self._size(args[0]) // w
        return self._size(args[0]) if self.dist.get_rank() == 0 else 0  # broadcast

    def restore(self) -> None:
        for n, f in self._orig.items():
            setattr(self.dist, n, f)


def _worker(rank: int, world: int, name: str, b: int, d: int, repeats: int):
    import torch
    import torch.nn.functional as F

    from clipfnd import distributed
    from clipfnd.config import load_config
    from clipfnd.state import StateTables
    from clipfnd.train.objective import ClipObjective

    B = b * world
    overrides = SETTINGS[name]
    if overrides is None:
        from open_clip.loss import ClipLoss

        loss_fn = ClipLoss(
            local_loss="local_loss" in name, gather_with_grad=True, rank=rank, world_size=world
        )
    else:
        cfg = load_config(None, ["data.train=unused"] + [f"{k}={v}" for k, v in overrides.items()])
        objective = ClipObjective(cfg, StateTables(B * (repeats + 1)), has_labels=False)
    log_scale = torch.nn.Parameter(torch.tensor(2.659))
    tally = Tally()
    times = []
    for step in range(repeats + 1):
        g = torch.Generator().manual_seed(1000 * step + rank)
        img = F.normalize(torch.randn(b, d, generator=g), dim=1).requires_grad_()
        txt = F.normalize(torch.randn(b, d, generator=g), dim=1).requires_grad_()
        index = torch.arange(b) + rank * b + step * B
        torch.distributed.barrier()
        tally.on = step == 1  # one step's collectives (the first is a warm-up)
        t0 = time.perf_counter()
        if overrides is None:
            loss = loss_fn(img, txt, log_scale.exp())
        else:
            out = objective(img, txt, log_scale.exp(), index, torch.zeros(b, dtype=torch.long), 0)
            objective.commit(out)
            loss = out.loss
        loss.backward()
        t = time.perf_counter() - t0
        tally.on = False
        if step:
            times.append(t)
    tally.restore()
    del distributed
    return {"calls": tally.calls, "bytes": tally.bytes, "seconds": statistics.median(times)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--worlds", type=int, nargs="+", default=[2, 4])
    p.add_argument("--local-batch", type=int, nargs="+", default=[64, 256])
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--quick", action="store_true", help="2 processes, b = 32, 3 repeats")
    a = p.parse_args()
    if a.quick:
        a.worlds, a.local_batch, a.repeats = [2], [32], 3
    # processes of the GloFND settings at b = 256 sometimes abort in the interpreter's
    # teardown, after their results are written ("terminate called without an active
    # exception", no Python frame): end them with os._exit
    from clipfnd.testing.gloo import run_group

    print(f"d = {a.dim}, float32 features; bytes each process sends per step; median step time")
    print(f"{'W':>2} {'b':>4}  {'setting':<50} {'KiB sent':>9} {'ms':>8}  collectives")
    for w in a.worlds:
        for b in a.local_batch:
            feats = 2 * (w - 1) * b * a.dim * 4 / 1024
            for name in SETTINGS:
                r = run_group(_worker, w, name, b, a.dim, a.repeats, hard_exit=True)[0]
                calls = ", ".join(f"{k} x{v}" for k, v in sorted(r["calls"].items()))
                print(
                    f"{w:>2} {b:>4}  {name:<50} {r['bytes'] / 1024:9.1f} "
                    f"{1e3 * r['seconds']:8.2f}  {calls}",
                    flush=True,
                )
            print(f"{'':8}features one way, 2 (W-1) b d floats: {feats:.1f} KiB")


if __name__ == "__main__":
    main()
