"""Mini-batch contrastive loss (CLIP, bidirectional), with false-negative removal.

Radford et al., "Learning Transferable Visual Models From Natural Language Supervision"
(ICML 2021). docs/methods.md, "Base losses" and "Removing detected false negatives".

For local anchors ``i`` (this rank's ``b`` samples) against the gathered ``B`` samples of the
other modality, with logits ``l_ij = s_ij / tau`` and positive column ``p(i) = offset + i``::

    plain:      L_i = -log( e^{l_ip} / sum_j e^{l_ij} )
    eliminate:  L_i = -log( e^{l_ip} / ( e^{l_ip} + (|N_i|/|K_i|) sum_{j in K_i} e^{l_ij} ) )
                (no rescaling: the factor is 1; K_i empty: the negative sum is 0, L_i = 0)
    attract:    L_i = -mean_{q in {p} U F_i} log( e^{l_iq} / sum_j e^{l_ij} )

    L = 1/2 * mean_i L_i(image -> text) + 1/2 * mean_i L_i(text -> image)

Columns marked ``not_negative`` (other copies of the anchor's own sample, when a dataset
index repeats in the global batch) are in neither sum and not counted in ``|N_i|``.

The loss knows nothing of how the features were gathered: the caller passes local and
gathered features and the column offset of its first sample.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def contrastive_rows(
    logits: torch.Tensor,
    pos: torch.Tensor,
    fn_mask: torch.Tensor | None = None,
    removal: str = "eliminate",
    rescale: bool = True,
    not_negative: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-anchor InfoNCE losses for rows of ``logits`` with false negatives handled.

    Shape:
        logits: ``[b, M]`` (already divided by the temperature); pos: ``[b]`` positive columns;
        fn_mask: ``[b, M]`` bool, True where a negative is a flagged false negative (must be
        False at the positive); not_negative: ``[b, M]`` bool, columns that are no negative
        at all (left out of every sum and of ``|N_i|``). Returns ``[b]``.
    """
    if fn_mask is None and not_negative is None:
        return F.cross_entropy(logits, pos, reduction="none")
    b, m = logits.shape
    rows = torch.arange(b, device=logits.device)
    no_col = torch.zeros(b, dtype=torch.bool, device=logits.device)
    with torch.no_grad():
        excluded = (
            torch.zeros(b, m, dtype=torch.bool, device=logits.device)
            if not_negative is None
            else not_negative.index_put((rows, pos), no_col)
        )
        fn_mask = excluded.clone() if fn_mask is None else fn_mask.index_put((rows, pos), no_col)
        fn_mask &= ~excluded
        n_flagged = fn_mask.sum(1)
        n_neg = (m - 1) - excluded.sum(1)
    if removal == "attract":
        # -mean_{q in {p} U F} log softmax(l)_q  ==  cross-entropy with uniform targets on {p} U F
        with torch.no_grad():
            targets = fn_mask.to(logits.dtype)
            targets[rows, pos] = 1.0
            targets /= (n_flagged + 1).to(logits.dtype)[:, None]
        if not_negative is None:
            return F.cross_entropy(logits, targets, reduction="none")
        log_p = torch.log_softmax(logits.masked_fill(excluded, float("-inf")), dim=1)
        return -(targets * log_p.masked_fill(excluded, 0.0)).sum(1)
    if removal != "eliminate":
        raise ValueError(f"removal must be 'eliminate' or 'attract', got {removal!r}")
    # -log(e^{l_p} / (e^{l_p} + c sum_K e^{l_j}))  ==  cross-entropy of l + A, where A is log c on
    # kept negatives, -inf on flagged ones and 0 at the positive (c = |N|/|K|, or 1). A needs no
    # gradient, so the loss is one fused cross-entropy; a row with nothing kept gives 0, no NaN.
    with torch.no_grad():
        n_kept = n_neg - n_flagged
        if rescale:
            log_c = torch.log(n_neg.clamp(min=1).to(logits.dtype)) - torch.log(
                n_kept.clamp(min=1).to(logits.dtype)
            )
        else:
            log_c = torch.zeros(b, dtype=logits.dtype, device=logits.device)
        shift = log_c[:, None].expand(b, m).masked_fill(fn_mask | excluded, float("-inf"))
        shift[rows, pos] = 0.0
    return F.cross_entropy(logits + shift, pos, reduction="none")


def info_nce_rows(
    anchors: torch.Tensor,
    others: torch.Tensor,
    pos: torch.Tensor,
    logit_scale: torch.Tensor | float,
    fn_mask: torch.Tensor | None = None,
    removal: str = "eliminate",
    rescale: bool = True,
    not_negative: torch.Tensor | None = None,
) -> torch.Tensor:
    """``contrastive_rows`` of the logits ``logit_scale * anchors @ others.T``: the per-anchor
    losses of one anchor type (``[b, d]`` anchors against ``[M, d]`` candidates). ``[b]``."""
    logits = logit_scale * anchors @ others.T
    return contrastive_rows(logits, pos, fn_mask, removal, rescale, not_negative)
