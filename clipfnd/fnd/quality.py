"""Detection quality, from labels (class or concept ids).

docs/methods.md, "Oracle detector": the negatives that share the anchor's label are the truth
``T_i`` against which a detector's flags ``F_i`` are scored: precision ``|F ∩ T| / |F|`` and
recall ``|F ∩ T| / |T|``. The same truth is what the oracle detector flags.
"""

from __future__ import annotations

import torch


def same_label(
    label_anchor: torch.Tensor, label_other: torch.Tensor, pos: torch.Tensor
) -> torch.Tensor:
    """``[b, M]`` bool: negatives with the anchor's label (the positive column ``pos`` excluded;
    labels < 0 mean unknown and never match)."""
    eq = (label_anchor[:, None] == label_other[None, :]) & (label_other[None, :] >= 0)
    eq &= (label_anchor >= 0)[:, None]
    eq[torch.arange(eq.shape[0], device=eq.device), pos] = False
    return eq


def detection_counts(
    flags: torch.Tensor, truth: torch.Tensor, num_negatives: int | torch.Tensor
) -> torch.Tensor:
    """Counts to sum over anchors and ranks: [true positives, flagged, true, negatives, anchors
    with every negative flagged]. Float64 ``[5]``. ``num_negatives``: ``|N_i|``, one number or
    one per anchor."""
    per_row = flags.sum(1)
    n = torch.as_tensor(num_negatives, device=flags.device).expand(flags.shape[0])
    return torch.stack(
        [
            (flags & truth).sum(),
            per_row.sum(),
            truth.sum(),
            n.sum(),
            (per_row == n).sum(),
        ]
    ).to(torch.float64)


def detection_metrics(
    counts: torch.Tensor, prefix: str, with_truth: bool = True
) -> dict[str, float]:
    """Share flagged, anchors with nothing kept, and (with labels) precision and recall.
    A ratio without a denominator (precision with nothing flagged, recall with no false
    negative in the batch) is left out rather than logged as a false 0."""
    tp, flagged, true, neg, all_flagged = counts.tolist()
    out = {f"{prefix}anchors_all_flagged": all_flagged}
    if neg:
        out[f"{prefix}flagged_share"] = flagged / neg
    if with_truth and flagged:
        out[f"{prefix}precision"] = tp / flagged
    if with_truth and true:
        out[f"{prefix}recall"] = tp / true
    return out
