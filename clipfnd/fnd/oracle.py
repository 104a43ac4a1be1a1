"""The oracle detector and detection quality, from labels (class or concept ids).

METHODS.md, "Oracle detector": ``F_i`` = the negatives that share the anchor's label. It is
the upper bound of any detector, and the truth ``T_i`` against which a detector's flags are
scored: precision ``|F ∩ T| / |F|`` and recall ``|F ∩ T| / |T|``.
"""

from __future__ import annotations

import torch


def same_label(label_anchor: torch.Tensor, label_other: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """``[b, M]`` bool: negatives with the anchor's label (labels < 0 mean unknown: never)."""
    eq = label_anchor[:, None] == label_other[None, :]
    known = (label_anchor[:, None] >= 0) & (label_other[None, :] >= 0)
    return eq & known & negatives


def detection_counts(flags: torch.Tensor, truth: torch.Tensor, negatives: torch.Tensor) -> torch.Tensor:
    """Counts to sum over anchors and ranks: [true positives, flagged, true, negatives, anchors
    with every negative flagged]. Float64 ``[5]``."""
    tp = (flags & truth).sum()
    flagged = flags.sum()
    true = truth.sum()
    neg = negatives.sum()
    all_flagged = ((negatives & ~flags).sum(1) == 0).sum()
    return torch.stack([tp, flagged, true, neg, all_flagged]).to(torch.float64)


def detection_metrics(counts: torch.Tensor, prefix: str, with_truth: bool = True) -> dict[str, float]:
    """Share flagged, anchors with nothing kept, and (with labels) precision and recall."""
    tp, flagged, true, neg, all_flagged = counts.tolist()
    out = {
        f"{prefix}flagged_share": flagged / neg if neg else 0.0,
        f"{prefix}anchors_all_flagged": all_flagged,
    }
    if with_truth:
        out[f"{prefix}precision"] = tp / flagged if flagged else 0.0
        out[f"{prefix}recall"] = tp / true if true else 0.0
    return out
