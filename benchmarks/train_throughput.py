"""Training-step throughput of a model at a few batch sizes (one process, in-memory batch).

    python benchmarks/train_throughput.py [--model clipfnd-tiny-vit] [--batches 32 64 128 256]

Prints samples/s and ms per optimiser step (forward, CLIP loss, backward, AdamW step), and
the same with GloFND on, measured interleaved with the plain step.
"""

from __future__ import annotations

import argparse
import statistics

import torch
from step_timer import describe_device, interleaved, make_step


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model", default="clipfnd-tiny-vit")
    p.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256])
    p.add_argument("--repeats", type=int, default=10)
    a = p.parse_args()
    device = describe_device()
    print(
        f"device: {device}; model {a.model}; torch {torch.__version__}; median of {a.repeats} steps"
    )
    print()
    print(f"{'batch':>6} {'ms/step':>9} {'samples/s':>10} {'+GloFND samples/s':>18}")
    for batch in a.batches:
        plain = make_step([], batch, 10**5, a.model)
        fnd = make_step(["fnd.detector=glofnd"], batch, 10**5, a.model)
        tp, tf = interleaved(plain, fnd, a.repeats)
        mp, mf = statistics.median(tp), statistics.median(tf)
        print(f"{batch:>6} {mp * 1e3:9.1f} {batch / mp:10.1f} {batch / mf:18.1f}")


if __name__ == "__main__":
    main()
