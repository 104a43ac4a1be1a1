"""Keeping a detector's flags calibrated (docs/methods.md, "Calibration"): when masking
starts, the batch quantiles GloFND's offset and shared threshold are read from, and the band
within which the flagged share counts as calibrated.

Quantiles over a global batch are read from a histogram of fixed bins over ``[-2, 2]`` (a
cosine similarity, or a similarity less a threshold in ``[-1, 1]``): integer counts that every
process adds up exactly, so 2 processes find the very quantile 1 process finds, and the
communication is a few thousand numbers whatever the batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

HIST_LOW, HIST_HIGH, HIST_BINS = -2.0, 2.0, 4000  # bins of 0.001
CALIBRATED = (0.75, 4.0 / 3.0)  # flagged / alpha within this band: calibrated
WARN = (0.5, 2.0)  # flagged / alpha outside this band for an epoch of masking: a warning


def calibrated_count(flagged: float, negatives: float, alpha: float) -> bool:
    """Whether a step's ``flagged`` of ``negatives`` is calibrated: within ``CALIBRATED`` of
    ``alpha``, or, where the batch is too small to tell, within three standard deviations of
    the binomial count ``alpha * negatives`` (at ``alpha = 1e-3`` and a batch of 64 a step
    holds about 8 flags: their count varies by a third from step to step)."""
    expected = alpha * negatives
    if not negatives:
        return False
    if CALIBRATED[0] * expected <= flagged <= CALIBRATED[1] * expected:
        return True
    return abs(flagged - expected) <= 3 * math.sqrt(expected * (1 - alpha))


def histogram(values: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
    """Counts (int64 ``[HIST_BINS]``) of ``values`` (where ``keep``) in the fixed bins."""
    v = values if keep is None else values[keep]
    width = (HIST_HIGH - HIST_LOW) / HIST_BINS
    idx = ((v.detach().to(torch.float64) - HIST_LOW) / width).floor()
    idx = idx.clamp(0, HIST_BINS - 1).to(torch.long)
    return torch.bincount(idx.flatten(), minlength=HIST_BINS)


def upper_quantile(counts: torch.Tensor, share: float) -> float | None:
    """The value above which ``share`` of the histogram's mass lies (linear within its bin;
    within one bin width, 0.001, of the exact quantile). None for an empty histogram."""
    total = int(counts.sum())
    if total == 0:
        return None
    width = (HIST_HIGH - HIST_LOW) / HIST_BINS
    target = share * total
    from_top = counts.flip(0).cumsum(0)
    k = int(torch.searchsorted(from_top.to(torch.float64), torch.tensor([target]))[0])
    k = min(k, HIST_BINS - 1)
    i = HIST_BINS - 1 - k  # the bin the quantile falls in
    above = float(from_top[k] - counts[i])  # mass in the bins above it
    inside = float(counts[i])
    frac = (target - above) / inside if inside else 0.0
    return HIST_LOW + (i + 1) * width - frac * width


@dataclass(frozen=True)
class MaskStart:
    """When flags start being used (``fnd.start_mask``): at an ``epoch`` (an integer), after a
    ``fraction`` of the run's optimiser steps (``0.3`` or ``"30%"``), or ``auto``: once the
    flagged share has stayed calibrated (within ``CALIBRATED`` of alpha) for a window of
    steps."""

    kind: str  # epoch | fraction | auto
    value: float = 0.0

    @classmethod
    def parse(cls, spec: int | float | str) -> MaskStart:
        """``ValueError`` naming the forms accepted for anything else."""
        forms = "an epoch (an integer >= 0), a share of training (0.3 or 30%), or auto"
        if isinstance(spec, bool):
            raise ValueError(f"fnd.start_mask={spec!r}: give {forms}")
        if isinstance(spec, int):
            if spec < 0:
                raise ValueError(f"fnd.start_mask={spec}: give {forms}")
            return cls("epoch", spec)
        if isinstance(spec, str):
            text = spec.strip().lower()
            if text == "auto":
                return cls("auto")
            if text.endswith("%"):
                try:
                    spec = float(text[:-1]) / 100
                except ValueError:
                    raise ValueError(f"fnd.start_mask={spec!r}: give {forms}") from None
            else:
                try:
                    return cls.parse(int(text))
                except ValueError:
                    raise ValueError(f"fnd.start_mask={spec!r}: give {forms}") from None
        if isinstance(spec, float):
            if not 0 <= spec < 1 or math.isnan(spec):
                raise ValueError(
                    f"fnd.start_mask={spec}: a share of training is in [0, 1) (or [0%, 100%)); "
                    "give an epoch as an integer"
                )
            return cls("fraction", spec)
        raise ValueError(f"fnd.start_mask={spec!r}: give {forms}")

    def first_step(self, total_steps: int) -> int:
        """The first optimiser step (1-based) that masks, for a ``fraction``."""
        return math.floor(self.value * total_steps) + 1

    def __str__(self) -> str:
        if self.kind == "epoch":
            return f"epoch {int(self.value)}"
        return f"{self.value:.0%} of training" if self.kind == "fraction" else "auto"
