"""GloFND's cost per training step, measured side by side in one run.

1. step time with GloFND (thresholds learned and masking) over the same step without a
   detector, at batch 256 and 1024 (goal: at most 1.05);
2. step time with GloFND with 10^4 table rows over 10^7 rows (goal: 1.00 +- 0.03: the
   per-step cost does not grow with the dataset);
3. what the clean view costs (``fnd.view=clean``, the default: one more image-tower forward
   without gradient) over GloFND on the training view (``fnd.view=train``).

Steps 1 and 2 time GloFND on the training view (what the goals were set for); 3 the rest.

    python benchmarks/glofnd_overhead.py [--repeats 15] [--model clipfnd-tiny-vit]
"""

from __future__ import annotations

import argparse
import statistics

import torch
from step_timer import describe_device, interleaved, make_step, ratio_of_medians

GLOFND = ["fnd.detector=glofnd", "fnd.alpha=0.01", "fnd.view=train"]
CLEAN = ["fnd.detector=glofnd", "fnd.alpha=0.01", "fnd.view=clean"]


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--model", default="clipfnd-tiny-vit")
    p.add_argument("--batches", type=int, nargs="+", default=[256, 1024])
    a = p.parse_args()
    device = describe_device()
    print(
        f"device: {device}; model {a.model}; torch {torch.__version__}; median of {a.repeats} interleaved steps"
    )
    print()
    print(f"{'comparison':<44} {'A ms':>9} {'B ms':>9} {'A/B':>7}  goal")
    for batch in a.batches:
        with_fnd = make_step(GLOFND, batch, 10**5, a.model)
        without = make_step([], batch, 10**5, a.model)
        ta, tb = interleaved(with_fnd, without, a.repeats)
        print(
            f"{f'GloFND / none, batch {batch}':<44} {statistics.median(ta) * 1e3:9.1f} "
            f"{statistics.median(tb) * 1e3:9.1f} {ratio_of_medians(ta, tb):7.3f}  <= 1.05"
        )
        clean = make_step(CLEAN, batch, 10**5, a.model)
        ta, tb = interleaved(clean, with_fnd, a.repeats)
        print(
            f"{f'GloFND clean view / training view, b {batch}':<44} "
            f"{statistics.median(ta) * 1e3:9.1f} {statistics.median(tb) * 1e3:9.1f} "
            f"{ratio_of_medians(ta, tb):7.3f}  (measured)"
        )
    batch = a.batches[0]
    small = make_step(GLOFND, batch, 10**4, a.model)
    large = make_step(GLOFND, batch, 10**7, a.model)
    ta, tb = interleaved(small, large, a.repeats)
    print(
        f"{f'N=1e4 / N=1e7 rows (GloFND), batch {batch}':<44} {statistics.median(ta) * 1e3:9.1f} "
        f"{statistics.median(tb) * 1e3:9.1f} {ratio_of_medians(ta, tb):7.3f}  1.00 +- 0.03"
    )


if __name__ == "__main__":
    main()
