"""The cost of cached gradient accumulation against one plain large batch (and against
independent micro-batches), measured side by side.

    python benchmarks/accumulation.py [--model clipfnd-tiny-vit] [--batch 256] [--k 4]
                                      [--steps 6] [--rounds 3] [--glofnd]

Each setting runs in its own process (so its peak memory is its own), rounds alternate the
settings' order, and the script prints per step: the median time, the ratio to the plain
batch, and the peak memory the steps added (on CUDA ``max_memory_allocated``; on the CPU the
growth of the process's peak resident set over its size before the first step, which
includes the optimiser's state, the same in every setting).

- ``plain``: one batch of ``batch`` samples (what fits when memory allows);
- ``cached``: ``k`` micro-batches of ``batch / k``, ``optim.accum_mode=cached`` (the same
  loss and gradients as ``plain``, one extra forward without gradients);
- ``independent``: ``k`` micro-batches, each its own batch (another objective, no extra
  forward).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import subprocess
import sys
import time


def one(setting: str, a: argparse.Namespace) -> dict:
    import torch

    from clipfnd.config import load_config
    from clipfnd.models import create_clip
    from clipfnd.state import StateTables
    from clipfnd.train.objective import ClipObjective
    from clipfnd.train.step import cached_window

    torch.manual_seed(0)
    dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    over = ["data.train=unused"]
    if a.glofnd:
        over += ["fnd.detector=glofnd", "fnd.init_threshold=0.3"]
    cfg = load_config(None, over)
    bundle = create_clip(a.model)
    model = bundle.model.to(dev).train()
    size = model.visual.image_size
    size = size[0] if isinstance(size, (tuple, list)) else size
    n = a.batch * (a.steps + 1)
    obj = ClipObjective(cfg, StateTables(n, dev), has_labels=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(a.batch, 3, size, size, generator=g)
    texts = bundle.tokenizer(["a photo of a red square and a blue circle"] * a.batch)
    k = 1 if setting == "plain" else a.k
    mb = a.batch // k

    def batches(step: int):
        out = []
        for j in range(k):
            sl = slice(j * mb, (j + 1) * mb)
            idx = torch.arange(step * a.batch + j * mb, step * a.batch + (j + 1) * mb)
            out.append(
                {
                    "image": images[sl],
                    "text": texts[sl],
                    "index": idx,
                    "label": -torch.ones_like(idx),
                }
            )
        return out

    def step(s: int) -> None:
        window = batches(s)
        if setting == "cached":
            cached_window(
                obj,
                model,
                window,
                dev,
                0,
                False,
                lambda loss: loss.backward(),
                lambda last: contextlib.nullcontext(),
                lambda loss: bool(torch.isfinite(loss)),
            )
        else:
            for b in window:
                (obj.batch_loss(model, b, dev, 0, False).loss / k).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if dev.type == "cuda":
            torch.cuda.synchronize()

    # the baseline before any step: weights, inputs, the interpreter (the optimiser's state,
    # allocated by the first step, counts in the peak: the same in every setting)
    if dev.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    step(0)  # warm-up (allocations, lazy init)
    times = []
    for s in range(1, a.steps + 1):
        t0 = time.perf_counter()
        step(s)
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    else:
        peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base_rss) / 1024
    return {
        "setting": setting,
        "step_s": statistics.median(times),
        "peak_mib": peak,
        "device": dev.type,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="clipfnd-tiny-vit")
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--k", type=int, default=4)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--glofnd", action="store_true")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.one:
        print(json.dumps(one(a.one, a)))
        return
    settings = ["plain", "cached", "independent"]
    got: dict[str, list[dict]] = {s: [] for s in settings}
    args = sys.argv[1:]
    for r in range(a.rounds):
        order = settings if r % 2 == 0 else settings[::-1]
        for s in order:
            out = subprocess.run(
                [sys.executable, __file__, *args, "--one", s],
                capture_output=True,
                text=True,
                check=True,
            )
            got[s].append(json.loads(out.stdout.strip().splitlines()[-1]))
    plain = statistics.median(x["step_s"] for x in got["plain"])
    dev = got["plain"][0]["device"]
    print(
        f"model {a.model}, batch {a.batch} (k={a.k} micro-batches of {a.batch // a.k}), "
        f"{a.steps} steps x {a.rounds} rounds, device {dev}{', GloFND' if a.glofnd else ''}"
    )
    print(f"{'setting':<12} {'step s':>8} {'vs plain':>9} {'peak MiB':>9}")
    for s in settings:
        t = statistics.median(x["step_s"] for x in got[s])
        m = statistics.median(x["peak_mib"] for x in got[s])
        print(f"{s:<12} {t:>8.3f} {t / plain:>8.2f}x {m:>9.0f}")


if __name__ == "__main__":
    main()
