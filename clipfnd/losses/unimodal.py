"""Vision-only (SimCLR-style) contrastive losses over two views of each image.

Chen et al., "A Simple Framework for Contrastive Learning of Visual Representations" (ICML
2020, NT-Xent); Chuang et al., "Debiased Contrastive Learning" (NeurIPS 2020, DCL); Robinson
et al., "Contrastive Learning with Hard Negative Samples" (ICLR 2021, HCL); Dong et al.,
"Sampling synthetic hard negative samples for contrastive learning" (arXiv 2304.02971, SSCL).
docs/methods.md, "SimCLR / NT-Xent" and "SSCL".

Layout. The ``2b`` local views are the anchors (rows); the ``2B`` gathered views are the
candidates (columns). For anchor row ``i``, ``pos[i]`` is the column of its other view and
``self_col[i]`` its own column, which is neither positive nor negative; the negatives ``N_i``
are the other ``2B - 2`` columns (both views of every other image), less whatever
``not_negative`` marks (copies of the anchor's image, flagged false negatives under
eliminate).

NT-Xent, per anchor (``s`` cosine similarities, ``t`` the temperature)::

    L_i = -log( e^{s_ip/t} / ( e^{s_ip/t} + sum_{j in N_i} e^{s_ij/t} ) )

Debiased and hard-negative losses (DCL, HCL, SSCL), over the negative pool ``M_i`` (``N_i``,
plus ``S`` synthetic negatives with SSCL)::

    w_j  = exp(beta s_ij / t) / mean_{k in M_i} exp(beta s_ik / t)
    Ng   = max( (sum_{j in M_i} w_j e^{s_ij/t} - tau_plus |M_i| e^{s_ip/t}) / (1 - tau_plus),
                |M_i| e^{-1/t} )
    L_i  = -log( e^{s_ip/t} / ( e^{s_ip/t} + Ng ) )

Synthetic negatives (SSCL): among each anchor's ``top_k`` hardest negatives (highest
``s_ij``), ``S`` pairs ``(a, b)`` with ``a != b`` are drawn uniformly and mixed,
``normalize(m n_a + (1 - m) n_b)``, ``m ~ U(0, 1)``. The paper's exact pairing rule is not
public; this one is drawn by ``draw_mixing`` from a given generator. Gradients flow through
the weights ``w`` and the synthetic negatives, as in HCL's code.

Special cases: DCL = no synthesis, ``beta = 0``; HCL = no synthesis, ``beta > 0``;
``tau_plus = 0``, ``beta = 0``, no synthesis = NT-Xent (the clamp never binds then).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


def view_columns(b: int, B: int, offset: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pos, self_col)`` of the ``2b`` local views among the ``2B`` gathered ones.

    Local rows are ``[view 1 of the b images; view 2 of the b images]``; gathered columns are
    ``[view 1 of all B images; view 2 of all B images]``; this rank's images start at
    ``offset``.
    """
    local = torch.arange(b, device=device) + offset
    self_col = torch.cat([local, local + B])
    pos = torch.cat([local + B, local])
    return pos, self_col


def _not_negative(
    m: int, self_col: torch.Tensor, not_negative: torch.Tensor | None
) -> torch.Tensor:
    rows = torch.arange(self_col.shape[0], device=self_col.device)
    excluded = torch.zeros(self_col.shape[0], m, dtype=torch.bool, device=self_col.device)
    excluded[rows, self_col] = True
    if not_negative is not None:
        excluded |= not_negative
    return excluded


@dataclass
class Mixing:
    """The draws that make SSCL's synthetic negatives, per anchor: ``a``, ``b`` ``[n, S]``
    ranks among its ``top_k`` hardest negatives (``a != b``), ``m`` ``[n, S]`` in ``[0, 1)``."""

    a: torch.Tensor
    b: torch.Tensor
    m: torch.Tensor


def draw_mixing(
    n: int, top_k: int, num_synthetic: int, generator: torch.Generator, device=None
) -> Mixing:
    """Uniform pairs of distinct ranks in ``[0, top_k)`` and mixing weights ``U(0, 1)``."""
    if top_k < 2:
        raise ValueError(f"synthesis needs top_k >= 2 hard negatives to mix, got {top_k}")
    a = torch.randint(0, top_k, (n, num_synthetic), generator=generator)
    b = (a + 1 + torch.randint(0, top_k - 1, (n, num_synthetic), generator=generator)) % top_k
    m = torch.rand(n, num_synthetic, generator=generator)
    return Mixing(a.to(device), b.to(device), m.to(device))


def synthetic_similarities(
    anchors: torch.Tensor,
    others: torch.Tensor,
    sim: torch.Tensor,
    valid: torch.Tensor,
    mixing: Mixing,
) -> torch.Tensor:
    """``[n, S]`` similarities of each anchor to its synthetic negatives (with gradient).

    ``sim`` ``[n, M]`` and ``valid`` ``[n, M]`` (the anchor's negatives) choose each anchor's
    hardest ``top_k`` columns; ``top_k`` is ``mixing``'s, at most the smallest ``|N_i|``.
    """
    top_k = int(torch.maximum(mixing.a.max(), mixing.b.max()).item()) + 1
    if int(valid.sum(1).min()) < top_k:
        raise ValueError(f"an anchor has fewer than top_k={top_k} negatives to mix")
    hard = sim.detach().masked_fill(~valid, float("-inf")).topk(top_k, dim=1).indices  # [n, k]
    fa = others[hard.gather(1, mixing.a)]  # [n, S, d]
    fb = others[hard.gather(1, mixing.b)]
    m = mixing.m.to(others.dtype).unsqueeze(-1)
    synthetic = F.normalize(m * fa + (1 - m) * fb, dim=-1)
    return (anchors.unsqueeze(1) * synthetic).sum(-1)


def _log1mexp(x: torch.Tensor) -> torch.Tensor:
    """``log(1 - e^x)`` for ``x < 0``, accurate near 0 and far below it (log1p or expm1,
    whichever is exact there); each branch sees only inputs where it is finite."""
    cut = -math.log(2.0)
    far = torch.log1p(-torch.exp(x.clamp(max=cut)))
    near = torch.log(-torch.expm1(x.clamp(min=cut)))
    return torch.where(x < cut, far, near)


def _log_difference(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``log(e^a - e^b)`` where ``a > b``, ``-inf`` elsewhere (the difference is <= 0 there)."""
    above = a > b
    gap = torch.where(above, b - a, torch.full_like(a, -1.0))  # < 0 in every branch taken
    return torch.where(above, a + _log1mexp(gap), torch.full_like(a, float("-inf")))


def _masked_logsumexp(x: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
    """``log sum_j e^{x_ij}`` over the columns not ``hidden`` (a row must keep one)."""
    return torch.logsumexp(x.masked_fill(hidden, float("-inf")), dim=1)


def debiased_rows(
    anchors: torch.Tensor,
    others: torch.Tensor,
    pos: torch.Tensor,
    self_col: torch.Tensor,
    tau: float,
    tau_plus: float,
    beta: float,
    mixing: Mixing | None = None,
    not_negative: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-anchor DCL / HCL / SSCL losses ``[n]`` (the module docstring's formula).

    ``mixing`` None: no synthesis (DCL with ``beta = 0``, HCL with ``beta > 0``).
    ``not_negative`` ``[n, M]``: columns left out of ``M_i`` (flagged false negatives, copies).
    An anchor with an empty pool has loss 0.

    Computed in log space, so that no ``e^{s/t}`` is ever formed (at ``t = 0.01`` it
    overflows float32), with ``z = s / t``::

        log sum_j w_j e^{z_j} = LSE_j((1 + beta) z_j) - LSE_j(beta z_j) + log|M_i|
        log Ng                = max( log(e^{that} - tau_plus |M_i| e^{z_p}) - log(1 - tau_plus),
                                     log|M_i| - 1/t )
        L_i                   = log(1 + e^{log Ng - z_p})
    """
    if not 0 <= tau_plus < 1:
        raise ValueError(f"tau_plus must be in [0, 1), got {tau_plus}")
    n, m = anchors.shape[0], others.shape[0]
    rows = torch.arange(n, device=anchors.device)
    sim = anchors @ others.T
    valid = ~_not_negative(m, self_col, not_negative)
    valid[rows, pos] = False
    s_pos = sim[rows, pos]
    pool, pool_valid = sim, valid
    if mixing is not None:
        s_syn = synthetic_similarities(anchors, others, sim, valid, mixing)
        pool = torch.cat([sim, s_syn], dim=1)
        pool_valid = torch.cat([valid, torch.ones_like(s_syn, dtype=torch.bool)], dim=1)
    count = pool_valid.sum(1)
    empty = count == 0
    hidden = ~pool_valid & ~empty[:, None]  # an empty row keeps its columns: no LSE of -infs
    z, z_pos = pool / tau, s_pos / tau
    log_count = torch.log(count.clamp(min=1).to(sim.dtype))
    log_ng = (
        _masked_logsumexp((1 + beta) * z, hidden) - _masked_logsumexp(beta * z, hidden) + log_count
    )
    if tau_plus > 0:
        log_bias = math.log(tau_plus) + log_count + z_pos
        log_ng = _log_difference(log_ng, log_bias) - math.log1p(-tau_plus)
    log_ng = torch.maximum(log_ng, log_count - 1.0 / tau)
    log_ng = log_ng.masked_fill(empty, float("-inf"))  # no negatives: Ng = 0, L_i = 0
    return torch.logaddexp(log_ng - z_pos, torch.zeros_like(z_pos))
