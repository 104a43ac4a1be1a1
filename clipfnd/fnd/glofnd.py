"""GloFND: a learned similarity threshold per anchor that flags global false negatives.

Balmaseda et al., "Discovering Global False Negatives On the Fly for Self-supervised
Contrastive Learning" (ICML 2025, arXiv 2502.20612). docs/methods.md, "GloFND".

Anchor ``n`` owns ``lambda_n``, the ``(1 - alpha)``-quantile of its similarities to the whole
dataset, learned from mini-batches by minimising ``alpha * l + mean_j (s_nj - l)_+``::

    g_n = alpha - (1 / (K |N_n|)) sum_k sum_{j in N_n} 1[s^k_nj > lambda_n]
    m_n <- beta1 m_n + (1 - beta1) g_n ;  v_n <- beta2 v_n + (1 - beta2) g_n^2
    lambda_n <- clamp(lambda_n - lr * mhat_n / (sqrt(vhat_n) + 1e-8), -1, 1)

with the bias correction counted per sample (``c_n`` updates so far), or, with
``bias_correction="epoch"``, by the absolute epoch (``t = epoch + 1``) as the reference code
does (the two agree only when updates start at epoch 0 and every sample is seen once an epoch). ``K`` is the number of
similarity rows an anchor has: 1 per modality (bimodal), 2 (the two views, unimodal).
Negatives above the threshold are flagged: ``F_n = {j in N_n : s_nj > lambda_n}``.

The detector reads and computes; it never writes the tables itself. ``update`` returns the
new rows, and the training step writes every table's rows in one synchronised call. Its
knobs have no defaults here: they are the ``fnd`` section of the config (``from_config``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..state import StateTables
from .base import Detection, DetectionInput, Detector

if TYPE_CHECKING:
    from ..config import FNDConfig

EPS = 1e-8


class GloFND(Detector):
    """Per-sample thresholds for each anchor type.

    Args:
        tables: the per-sample tables; four are added per anchor type ``t``:
            ``glofnd.lambda_t``, ``glofnd.m_t``, ``glofnd.v_t``, ``glofnd.count_t``.
        anchor_types: ``("img", "txt")`` bimodal (image anchors vs texts, text anchors vs
            images), ``("view",)`` unimodal (both views of an image share one threshold).
        alpha: share of the dataset above each threshold, in (0, 1).
        lr, optimizer ("adam" | "sgd"), beta1, beta2, init_threshold: the update rule.
        bias_correction: "sample" (per-sample update count) | "epoch" (``epoch + 1``).
        start_update, start_mask: epochs from which thresholds learn and flags are used.
    """

    name = "glofnd"
    needs_similarities = True

    def __init__(
        self,
        tables: StateTables,
        anchor_types: tuple[str, ...],
        *,
        alpha: float,
        lr: float,
        optimizer: str,
        beta1: float,
        beta2: float,
        init_threshold: float,
        bias_correction: str,
        start_update: int,
        start_mask: int,
    ):
        super().__init__(anchor_types, start_update=start_update, start_mask=start_mask)
        if bias_correction not in ("sample", "epoch"):
            raise ValueError(
                f"bias_correction must be 'sample' or 'epoch', got {bias_correction!r}"
            )
        self.bias_correction = bias_correction
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        self.tables = tables
        self.anchor_types = anchor_types
        self.alpha, self.lr, self.optimizer = alpha, lr, optimizer
        self.beta1, self.beta2 = beta1, beta2
        for t in anchor_types:
            tables.add(f"glofnd.lambda_{t}", init_threshold)
            tables.add(f"glofnd.m_{t}", 0.0)
            tables.add(f"glofnd.v_{t}", 0.0)
            tables.add(f"glofnd.count_{t}", 0.0)

    @classmethod
    def from_config(
        cls, fnd: FNDConfig, tables: StateTables, anchor_types: tuple[str, ...], **run
    ) -> GloFND:
        return cls(
            tables,
            anchor_types,
            alpha=fnd.alpha,
            lr=fnd.lr,
            optimizer=fnd.optimizer,
            beta1=fnd.beta1,
            beta2=fnd.beta2,
            init_threshold=fnd.init_threshold,
            bias_correction=fnd.bias_correction,
            start_update=fnd.start_update,
            start_mask=fnd.start_mask,
        )

    def updating(self, epoch: int) -> bool:
        return epoch >= self.start_update

    def detect(self, inp: DetectionInput) -> Detection:
        """Flags from the thresholds before this step's update (from ``start_mask`` on), and
        the update's new rows from the same flags (from ``start_update`` on)."""
        masking, updating = self.masking(inp.epoch), self.updating(inp.epoch)
        found = Detection({t: None for t in self.anchor_types})
        if not (masking or updating):
            return found
        k, b = inp.rows_per_sample, inp.index.numel()
        for t in self.anchor_types:
            lam = self.thresholds(t, inp.index).to(inp.sims[t].device).repeat(k)  # K rows each
            flags = self.flags(inp.sims[t], lam, [inp.pos])
            if inp.not_negative is not None:
                flags &= ~inp.not_negative
            if masking:
                found.flags[t] = flags
            if updating:
                found.rows.update(
                    self.update_from_flags(
                        t, inp.index, list(flags.split(b)), inp.num_negatives, epoch=inp.epoch
                    )
                )
        return found

    def threshold_metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for t in self.anchor_types:
            out.update(self.threshold_quantiles(t))
        return out

    def thresholds(self, anchor_type: str, index: torch.Tensor) -> torch.Tensor:
        return self.tables.rows(f"glofnd.lambda_{anchor_type}", index)

    @torch.no_grad()
    def flags(
        self, sim: torch.Tensor, lam: torch.Tensor, exclude: list[torch.Tensor]
    ) -> torch.Tensor:
        """``[b, M]`` bool: similarities above the anchor's threshold, among its negatives.

        ``exclude`` lists, per row, the columns that are not negatives (``[b]`` each): the
        positive, and in the unimodal case also the anchor's own other view.
        """
        f = sim > lam[:, None].to(sim.dtype)
        rows = torch.arange(sim.shape[0], device=sim.device)
        for cols in exclude:
            f[rows, cols] = False
        return f

    @torch.no_grad()
    def gradient(
        self, flags: list[torch.Tensor], num_negatives: int | torch.Tensor
    ) -> torch.Tensor:
        """``g = alpha - share of the K rows' negatives above the threshold``, per anchor.
        ``num_negatives``: ``|N_i|``, one number or one per anchor (``[b]``)."""
        above = sum(f.sum(1) for f in flags).to(torch.float64)
        n = torch.as_tensor(num_negatives, device=above.device).to(torch.float64).clamp(min=1)
        return (self.alpha - above / (len(flags) * n)).to(torch.float32)

    @torch.no_grad()
    def update(
        self,
        anchor_type: str,
        index: torch.Tensor,
        sims: list[torch.Tensor],
        exclude: list[list[torch.Tensor]],
        num_negatives: int,
        epoch: int = 0,
    ) -> dict[str, torch.Tensor]:
        """New rows for anchors ``index`` from their ``K`` similarity rows (not yet written).

        Args:
            sims: ``K`` tensors ``[b, M]``; exclude: per similarity row set, the columns that
                are not negatives (see ``flags``); num_negatives: ``|N_i|``.
        """
        lam = self.tables.rows(f"glofnd.lambda_{anchor_type}", index, sims[0].device)
        flags = [self.flags(s, lam, ex) for s, ex in zip(sims, exclude)]
        return self.update_from_flags(anchor_type, index, flags, num_negatives, epoch=epoch)

    @torch.no_grad()
    def update_from_flags(
        self,
        anchor_type: str,
        index: torch.Tensor,
        flags: list[torch.Tensor],
        num_negatives: int | torch.Tensor,
        epoch: int = 0,
    ) -> dict[str, torch.Tensor]:
        """As ``update``, from flags already computed with the current thresholds (the
        training step reuses the flags of its false-negative masks)."""
        t = anchor_type
        dev = flags[0].device
        lam = self.tables.rows(f"glofnd.lambda_{t}", index, dev)
        g = self.gradient(flags, num_negatives)
        count = self.tables.rows(f"glofnd.count_{t}", index, dev) + 1
        if self.optimizer == "sgd":
            new_lam = (lam - self.lr * g).clamp(-1.0, 1.0)
            return {f"glofnd.lambda_{t}": new_lam, f"glofnd.count_{t}": count}
        m = self.beta1 * self.tables.rows(f"glofnd.m_{t}", index, dev) + (1 - self.beta1) * g
        v = self.beta2 * self.tables.rows(f"glofnd.v_{t}", index, dev) + (1 - self.beta2) * g * g
        t_corr = count if self.bias_correction == "sample" else torch.full_like(count, epoch + 1.0)
        mhat = m / (1 - torch.pow(torch.tensor(self.beta1, device=dev), t_corr))
        vhat = v / (1 - torch.pow(torch.tensor(self.beta2, device=dev), t_corr))
        new_lam = (lam - self.lr * mhat / (torch.sqrt(vhat) + EPS)).clamp(-1.0, 1.0)
        return {
            f"glofnd.lambda_{t}": new_lam,
            f"glofnd.m_{t}": m,
            f"glofnd.v_{t}": v,
            f"glofnd.count_{t}": count,
        }

    @torch.no_grad()
    def threshold_quantiles(
        self, anchor_type: str, qs=(0.1, 0.5, 0.9), max_rows: int = 65536
    ) -> dict[str, float]:
        """Quantiles of the thresholds of samples updated at least once (a fixed subsample;
        under ``fnd.state=sharded``, of the rows this rank holds: an evenly spread 1/world)."""
        lam = self.tables.local(f"glofnd.lambda_{anchor_type}")
        seen = self.tables.local(f"glofnd.count_{anchor_type}") > 0
        vals = lam[seen]
        if vals.numel() == 0:
            return {}
        if vals.numel() > max_rows:
            step = vals.numel() // max_rows
            vals = vals[::step][:max_rows]
        q = torch.quantile(vals.float(), torch.tensor(qs, device=vals.device))
        return {
            f"lambda_{anchor_type}_q{int(p * 100):02d}": float(v) for p, v in zip(qs, q.tolist())
        }
