"""Per-anchor calibration of a threshold detector (docs/methods.md, "Per-anchor calibration").

GloFND's idea is per anchor: anchor ``n``'s threshold is the ``(1 - alpha)`` quantile of *its
own* similarities, so that each anchor flags about alpha of its own negatives. A batch's flagged
share says nothing about that (a single threshold for every anchor can flag alpha of a batch).
This module measures it directly, for a set of anchors against a set of columns (a bank of
encoded training samples while training, a whole split in ``clipfnd report``):

- each anchor's own flagged share, ``|{j in N_n : s_nj > theta_n}| / |N_n|``, over alpha;
- the share of anchors *within* ``BAND`` (0.5-2 x alpha) of alpha;
- ``|theta_n - q_n|``, the distance of each threshold from the anchor's own exact
  ``(1 - alpha)`` quantile ``q_n`` (linear interpolation, as ``torch.quantile``);
- the counterfactual: one global threshold ``g`` that flags the same total over all anchors
  (the ``T``-th largest negative similarity, ``T`` the thresholds' total flags), and the share of
  anchors within the band under ``g``. Per-sample thresholds earn their keep by the difference.

Everything is computed in float64, in chunks of anchors (memory ``chunk x columns``), in two
passes over the similarities: the first counts each anchor's flags and quantile, the second
finds the global threshold among the ``T`` largest negatives.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

BAND = (0.5, 2.0)  # an anchor's own flagged share within this multiple of alpha: calibrated


def columns_of(mode: str) -> dict[str, str]:
    """Which features an anchor type is compared with: its negatives' modality."""
    return {"img": "txt", "txt": "img"} if mode == "clip" else {"view": "view"}


@dataclass
class PerAnchor:
    """The measure for ``A`` anchors (tensors on the CPU, float64)."""

    alpha: float
    ratio: torch.Tensor  # [A] each anchor's own flagged share / alpha
    global_ratio: torch.Tensor  # [A] the same under the global threshold
    gap: torch.Tensor  # [A] threshold - own (1 - alpha) quantile
    global_threshold: float
    negatives: int  # negatives of an anchor (columns less its own)

    @property
    def within(self) -> float:
        return within_band(self.ratio)

    @property
    def global_within(self) -> float:
        return within_band(self.global_ratio)

    @property
    def median_gap(self) -> float:
        return float(self.gap.abs().median())

    def metrics(self, prefix: str) -> dict[str, float]:
        """The scalars logged and reported (``prefix`` e.g. ``fnd/anchors_img_``)."""
        return {
            f"{prefix}within": self.within,
            f"{prefix}within_global": self.global_within,
            f"{prefix}median_ratio": float(self.ratio.median()),
            f"{prefix}median_abs_gap": self.median_gap,
        }


def flag_thresholds(
    tables, anchor_type: str, rows: torch.Tensor, offsets: dict[str, float | None]
) -> torch.Tensor:
    """What GloFND compares a similarity with, for dataset rows ``rows``: the learned threshold
    plus the anchor type's offset (where the run keeps one), clamped to ``[-1, 1]``, in
    float64 on the CPU."""
    lam = tables.rows(f"glofnd.lambda_{anchor_type}", rows).double().cpu()
    return (lam + (offsets.get(anchor_type) or 0.0)).clamp(-1.0, 1.0)


def from_tables(
    feats: dict[str, torch.Tensor],
    columns: dict[str, str],
    index: torch.Tensor,
    pick: torch.Tensor,
    tables,
    offsets: dict[str, float | None],
    alpha: float,
) -> dict[str, float]:
    """The logged scalars (``fnd/anchors_{t}_within``, ...) for anchors ``pick`` (rows of
    ``feats``) of encoded samples with dataset indices ``index``, against every encoded
    sample: each anchor type ``t`` compared with ``feats[columns[t]]``, GloFND's thresholds
    read from ``tables`` (replicated, or sharded: every process calls with the same rows and
    gets every row), plus ``offsets[t]``, clamped to ``[-1, 1]``. Anchors whose threshold has
    not been set yet (no visit) are left out; ``fnd/anchors_{t}_measured`` counts the rest."""
    out: dict[str, float] = {}
    rows = index[pick.to(index.device)]
    for t, other in columns.items():
        seen = (tables.rows(f"glofnd.count_{t}", rows) > 0).cpu()
        if not bool(seen.any()):
            continue
        thr = flag_thresholds(tables, t, rows, offsets)
        a = pick.cpu()[seen]
        m = measure(feats[t][a], feats[other], a, thr[seen], alpha)
        out.update(m.metrics(f"fnd/anchors_{t}_"))
        out[f"fnd/anchors_{t}_measured"] = float(a.numel())
    return out


def within_band(ratio: torch.Tensor) -> float:
    """The share of anchors whose flagged share over alpha lies within ``BAND``."""
    if ratio.numel() == 0:
        return float("nan")
    ok = (ratio >= BAND[0]) & (ratio <= BAND[1])
    return float(ok.to(torch.float64).mean())


@torch.no_grad()
def measure(
    anchors: torch.Tensor,
    columns: torch.Tensor,
    own: torch.Tensor,
    thresholds: torch.Tensor,
    alpha: float,
    chunk: int = 512,
) -> PerAnchor:
    """Per-anchor calibration of ``thresholds`` ``[A]`` for ``anchors`` ``[A, d]`` against
    ``columns`` ``[N, d]`` (both normalised; similarity = dot product). ``own`` ``[A]``: the
    column of each anchor's positive (its caption, or itself for a view), which is no
    negative; every other column is. ``N - 1`` negatives per anchor."""
    a = anchors.detach().to("cpu", torch.float64)
    c = columns.detach().to("cpu", torch.float64)
    own = own.to("cpu", torch.long)
    thr = thresholds.detach().to("cpu", torch.float64)
    A, N = a.shape[0], c.shape[0]
    if N < 2:
        raise ValueError("per-anchor calibration needs at least 2 columns")
    n_neg = N - 1
    counts = torch.zeros(A, dtype=torch.float64)
    quant = torch.zeros(A, dtype=torch.float64)
    for lo in range(0, A, chunk):
        s = _chunk(a, c, own, lo, chunk)
        counts[lo : lo + chunk] = (s > thr[lo : lo + chunk, None]).sum(1).to(torch.float64)
        quant[lo : lo + chunk] = torch.nanquantile(s, 1 - alpha, dim=1)
    total = int(counts.sum())
    g = _kth_largest(a, c, own, total, chunk)
    global_counts = torch.zeros(A, dtype=torch.float64)
    for lo in range(0, A, chunk):
        s = _chunk(a, c, own, lo, chunk)
        global_counts[lo : lo + chunk] = (s > g).sum(1).to(torch.float64)
    return PerAnchor(
        alpha=alpha,
        ratio=counts / n_neg / alpha,
        global_ratio=global_counts / n_neg / alpha,
        gap=thr - quant,
        global_threshold=g,
        negatives=n_neg,
    )


def _chunk(a, c, own, lo: int, chunk: int) -> torch.Tensor:
    """Similarities of anchors ``lo : lo + chunk`` to every column, NaN at each own column."""
    s = a[lo : lo + chunk] @ c.T
    s[torch.arange(s.shape[0]), own[lo : lo + chunk]] = float("nan")
    return s


def _kth_largest(a, c, own, k: int, chunk: int) -> float:
    """The global threshold that flags ``k`` negatives: the ``(k + 1)``-th largest negative
    similarity over every anchor (``s > g`` holds for exactly the ``k`` largest, ties aside);
    above the largest when ``k`` is 0."""
    best = torch.empty(0, dtype=torch.float64)
    for lo in range(0, a.shape[0], chunk):
        s = _chunk(a, c, own, lo, chunk).flatten()
        s = s[~torch.isnan(s)]
        best = torch.cat([best, s]).topk(min(k + 1, best.numel() + s.numel())).values
    if k == 0:
        return float(best[0]) if best.numel() else 1.0
    if best.numel() <= k:  # every negative flagged
        return float(best[-1]) - 1.0
    return float(best[k])
