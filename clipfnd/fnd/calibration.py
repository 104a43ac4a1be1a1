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
    """Counts (int64 ``[HIST_BINS]``) of ``values`` (where ``keep``) in the fixed bins. A value
    outside ``[-2, 2]`` is refused (``ValueError``), never folded into an edge bin: callers
    bound what they count (GloFND: a similarity less a threshold clamped to ``[-1, 1]``)."""
    v = values if keep is None else values[keep]
    if v.numel() and not bool(((v >= HIST_LOW) & (v <= HIST_HIGH)).all()):
        bad = v[~((v >= HIST_LOW) & (v <= HIST_HIGH))].flatten()[0]
        raise ValueError(
            f"a value to count ({float(bad):g}) lies outside the histogram's "
            f"[{HIST_LOW:g}, {HIST_HIGH:g}]"
        )
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
