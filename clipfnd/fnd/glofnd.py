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

import logging
import math
from typing import TYPE_CHECKING

import torch

from .. import distributed
from ..state import StateTables
from .base import Detection, DetectionInput, Detector
from .calibration import CALIBRATED, WARN, calibrated_count, histogram, upper_quantile

if TYPE_CHECKING:
    from ..config import FNDConfig

EPS = 1e-8
INITS = ("constant", "quantile", "shared")
log = logging.getLogger(__name__)


def negatives(
    sims: torch.Tensor, pos: torch.Tensor, not_negative: torch.Tensor | None
) -> torch.Tensor:
    """``[n, M]`` bool: the columns that are negatives of each row (not its positive, not a
    column ``not_negative`` marks)."""
    neg = torch.ones_like(sims, dtype=torch.bool)
    neg[torch.arange(sims.shape[0], device=sims.device), pos] = False
    if not_negative is not None:
        neg &= ~not_negative
    return neg


def row_quantile(sims: torch.Tensor, neg: torch.Tensor, alpha: float, k: int) -> torch.Tensor:
    """``[b]``: the ``(1 - alpha)`` quantile of each row's negatives (linear interpolation, as
    ``torch.quantile``), the mean over a sample's ``k`` rows."""
    masked = sims.detach().to(torch.float64).masked_fill(~neg, float("nan"))
    q = torch.nanquantile(masked, 1 - alpha, dim=1)
    return q.view(k, -1).mean(0).to(torch.float32)


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
        start_update, start_mask: when thresholds learn (an epoch) and flags are used (an
            epoch, a share of training, or ``auto``).
        init: a threshold's start: "constant" (``init_threshold``), "quantile" (at the
            sample's first visit, the ``(1 - alpha)`` quantile of its own similarities to the
            batch's negatives), "shared" (at its first visit, that quantile over every
            anchor's negatives in the global batch).
        offset: add to every threshold of an anchor type an offset re-estimated every step
            (the ``(1 - alpha)`` quantile of similarity less threshold over the global batch's
            negatives): it follows the similarities between a sample's visits.
        start_mask_window: ``auto``: the steps in a row the flagged share must stay within
            ``CALIBRATED`` of alpha (None: one epoch's steps).
    """

    name = "glofnd"
    needs_similarities = True
    calibrates = True

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
        start_mask: int | float | str,
        init: str = "constant",
        offset: bool = False,
        start_mask_window: int | None = None,
    ):
        super().__init__(anchor_types, start_update=start_update, start_mask=start_mask)
        if bias_correction not in ("sample", "epoch"):
            raise ValueError(
                f"bias_correction must be 'sample' or 'epoch', got {bias_correction!r}"
            )
        if init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {init!r}")
        self.bias_correction = bias_correction
        if not 0 < alpha < 1:
            raise ValueError(f"alpha must be in (0, 1), got {alpha}")
        if optimizer not in ("adam", "sgd"):
            raise ValueError(f"optimizer must be 'adam' or 'sgd', got {optimizer!r}")
        self.tables = tables
        self.anchor_types = anchor_types
        self.alpha, self.lr, self.optimizer = alpha, lr, optimizer
        self.beta1, self.beta2 = beta1, beta2
        self.init, self.offset = init, offset
        self.window = start_mask_window
        for t in anchor_types:
            tables.add(f"glofnd.lambda_{t}", init_threshold)
            tables.add(f"glofnd.m_{t}", 0.0)
            tables.add(f"glofnd.v_{t}", 0.0)
            tables.add(f"glofnd.count_{t}", 0.0)
        # run-wide state (``state_dict``): the offset and shared threshold of the last step,
        # steps in a row calibrated, and the flags of the current epoch's masked steps
        self.offsets: dict[str, float | None] = {t: None for t in anchor_types}
        self.shared: dict[str, float | None] = {t: None for t in anchor_types}
        self.streak = 0
        self.epoch_counts = [0.0, 0.0]  # flagged, negatives
        self.warned = False
        self.row_negatives: int | None = None  # negatives of a similarity row (check_batch)
        self._window_counts = [0.0, 0.0]  # since the last log line (not checkpointed)
        self._pending: dict[str, float] = {}  # this step's offsets / shared thresholds

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
            init=fnd.init,
            offset=fnd.offset,
            start_mask_window=fnd.start_mask_window,
        )

    def check_batch(self, rows: int, negatives_per_row: int) -> None:
        """``fnd.alpha`` against the batch. Below one flag per global batch (``alpha`` x its
        ``rows * negatives_per_row`` negatives < 1) nothing a batch measures can place a
        threshold (the offset, a shared start, the update's share): refused. Below one flag
        per row under ``init=quantile``, a first visit's threshold (the batch quantile of the
        anchor's own negatives) cannot lie above its hardest negative, so first visits flag
        ``1 / negatives_per_row`` instead of alpha: a warning that says so."""
        self.row_negatives = negatives_per_row
        total = rows * negatives_per_row
        if self.alpha * total < 1:
            raise ValueError(
                f"fnd.alpha={self.alpha:g} asks for less than one flagged negative in a global "
                f"batch ({total} negatives per anchor type): the smallest share a batch can "
                f"flag is 1/{total} = {1 / total:.3g}; raise fnd.alpha to at least that, or "
                f"data.batch_size until a global batch holds 1/alpha = {1 / self.alpha:.3g} "
                "negatives or more"
            )
        if self.init == "quantile" and self.alpha * negatives_per_row < 1:
            log.warning(
                "fnd.alpha=%g is below 1/%d, the smallest share of an anchor's %d negatives "
                "in a global batch: a first visit's threshold (fnd.init=quantile, the batch "
                "quantile of the anchor's own negatives) flags its hardest negative, %.1f x "
                "fnd.alpha, until the threshold has learned; fnd.init=shared (the quantile over "
                "the whole global batch) or a larger data.batch_size avoids it, and "
                "fnd.start_mask=1 or auto keeps those flags out of the loss",
                self.alpha,
                negatives_per_row,
                negatives_per_row,
                1 / (self.alpha * negatives_per_row),
            )

    def plan(self, total_steps: int, steps_per_epoch: int) -> None:
        super().plan(total_steps, steps_per_epoch)
        if self.window is None:
            self.window = max(1, steps_per_epoch)

    def updating(self, epoch: int) -> bool:
        return epoch >= self.start_update

    def ready_to_mask(self) -> bool:
        return self.window is not None and self.streak >= self.window

    def detect(self, inp: DetectionInput) -> Detection:
        """Flags from the thresholds before this step's update (once masking has started),
        and the update's new rows from the same flags (from ``start_update`` on). A sample
        seen for the first time under ``init`` quantile or shared gets its threshold from
        this step (flags included), and no Adam step."""
        masking = inp.inference or self.masking(inp.epoch)
        updating = self.updating(inp.epoch) and not inp.inference
        found = Detection({t: None for t in self.anchor_types})
        if not (masking or updating):
            return found
        k, b = inp.rows_per_sample, inp.index.numel()
        for t in self.anchor_types:
            sims = inp.sims[t]
            neg = negatives(sims, inp.pos, inp.not_negative)
            dev = sims.device
            lam = self.thresholds(t, inp.index).to(dev)
            fresh = torch.zeros_like(lam, dtype=torch.bool)
            if self.init != "constant":
                fresh = (self.tables.rows(f"glofnd.count_{t}", inp.index) == 0).to(dev)
            shared = self._shared(t, sims, neg, inp) if self.init == "shared" else None
            offset = self._offset(t, sims, lam, neg, fresh.repeat(k), inp)
            q = None  # each row's quantile, computed once for a start and the logged gap
            if bool(fresh.any()):  # theta = the start value, stored less this step's offset
                if shared is None:
                    q = row_quantile(sims, neg, self.alpha, k)
                start = shared if shared is not None else q
                lam = torch.where(fresh, torch.as_tensor(start, device=dev) - offset, lam)
            theta = (lam + offset).to(sims.dtype)
            flags = (sims > theta.repeat(k)[:, None]) & neg
            if masking:
                found.flags[t] = flags
            if updating:
                rows = self.update_from_flags(
                    t, inp.index, list(flags.split(b)), inp.num_negatives, epoch=inp.epoch
                )
                if bool(fresh.any()):  # the start value, no Adam step at a first visit
                    rows[f"glofnd.lambda_{t}"] = torch.where(fresh, lam, rows[f"glofnd.lambda_{t}"])
                    for key in (f"glofnd.m_{t}", f"glofnd.v_{t}"):
                        if key in rows:
                            rows[key] = torch.where(fresh, torch.zeros_like(rows[key]), rows[key])
                found.rows.update(rows)
                found.stats[f"glofnd.flagged_{t}"] = torch.stack([flags.sum(), neg.sum()]).to(
                    torch.float64
                )
            if inp.measure:
                if q is None:
                    q = row_quantile(sims, neg, self.alpha, k)
                found.metrics[f"fnd/threshold_gap_{t}"] = float((theta - q).mean())
        return found

    def _offset(
        self,
        t: str,
        sims: torch.Tensor,
        lam: torch.Tensor,
        neg: torch.Tensor,
        fresh: torch.Tensor,
        inp: DetectionInput,
    ) -> float:
        """This step's offset of anchor type ``t`` (0 without ``offset``): the ``(1 - alpha)``
        quantile of ``s - lambda`` over the global batch's negatives of anchors whose
        threshold is already set (the last step's offset when there are none, and outside
        training)."""
        if not self.offset:
            return 0.0
        last = self.offsets[t] if self.offsets[t] is not None else 0.0
        if inp.inference:
            return last
        k = sims.shape[0] // lam.shape[0]
        residual = sims.to(torch.float64) - lam.to(torch.float64).repeat(k)[:, None]
        counts = distributed.all_reduce_sum(histogram(residual, neg & ~fresh[:, None]))
        q = upper_quantile(counts, self.alpha)
        value = last if q is None else q
        self._pending[f"offset_{t}"] = value
        return value

    def _shared(
        self, t: str, sims: torch.Tensor, neg: torch.Tensor, inp: DetectionInput
    ) -> float | None:
        """``init=shared``: the ``(1 - alpha)`` quantile of every negative's similarity in the
        global batch (outside training: the last step's)."""
        if inp.inference:
            return self.shared[t]
        counts = distributed.all_reduce_sum(histogram(sims, neg))
        value = upper_quantile(counts, self.alpha)
        if value is not None:
            self._pending[f"shared_{t}"] = value
        return value

    def after_step(self, stats: dict[str, torch.Tensor], masked: bool) -> dict[str, float]:
        out = super().after_step(stats, masked)
        for t in self.anchor_types:
            if f"offset_{t}" in self._pending:
                self.offsets[t] = self._pending[f"offset_{t}"]
            if f"shared_{t}" in self._pending:
                self.shared[t] = self._pending[f"shared_{t}"]
        self._pending = {}
        counts = [
            stats[f"glofnd.flagged_{t}"]
            for t in self.anchor_types
            if f"glofnd.flagged_{t}" in stats
        ]
        if not counts:
            return out
        ratios = [float(c[0]) / max(float(c[1]), 1.0) / self.alpha for c in counts]
        calibrated = all(calibrated_count(float(c[0]), float(c[1]), self.alpha) for c in counts)
        self.streak = self.streak + 1 if calibrated else 0
        total = sum(counts)
        self._window_counts = [a + float(x) for a, x in zip(self._window_counts, total)]
        if masked:
            self.epoch_counts = [a + float(x) for a, x in zip(self.epoch_counts, total)]
        if "fnd/mask_start_step" in out:
            log.info(
                "GloFND: masking starts at step %d (%s; flagged share %.2f x fnd.alpha at the "
                "step before)",
                self.steps,
                self.mask_start,
                sum(ratios) / len(ratios),
            )
        return out

    def epoch_report(self) -> str | None:
        flagged, negatives = self.epoch_counts
        self.epoch_counts = [0.0, 0.0]
        if not negatives or self.warned:
            return None
        ratio = flagged / negatives / self.alpha
        if WARN[0] <= ratio <= WARN[1]:
            return None
        self.warned = True
        n = self.row_negatives
        if ratio > WARN[1] and self.offset:
            # the offset calibrates every threshold already set: the excess is first visits
            if self.init == "quantile" and n and self.alpha * n < 1:
                why = (
                    f"fnd.alpha is below 1/{n}, so a first visit's threshold (the batch quantile "
                    f"of the anchor's own {n} negatives) flags its hardest negative: set "
                    "fnd.init=shared, raise data.batch_size, or start masking after the first "
                    "epoch (fnd.start_mask=1 or auto)"
                )
            else:
                why = (
                    "first visits flag more than alpha while their thresholds start: start "
                    "masking after the first epoch (fnd.start_mask=1 or auto)"
                )
        elif ratio > WARN[1]:
            why = (
                "the thresholds sit below the similarities, which rise as the model trains "
                "while a threshold moves once per visit of its sample: set fnd.offset=true (an "
                "offset re-estimated every step follows them), or start later (fnd.start_mask)"
            )
        elif self.offset:
            why = (
                "the offset calibrates the thresholds already set, so first visits flag too "
                "little: "
                + (
                    "set fnd.init=quantile (each threshold starts at its sample's quantile) or "
                    if self.init == "constant"
                    else ""
                )
                + "start masking after the first epoch (fnd.start_mask=1 or auto)"
            )
        else:
            why = (
                "the thresholds sit above the similarities: set fnd.init=quantile (each "
                "threshold starts at its sample's quantile) or fnd.offset=true, or raise fnd.lr"
            )
        shown = f"{ratio:.2f}"  # 3 decimals where 2 would round onto the band (0.497: 0.50)
        if WARN[0] <= float(shown) <= WARN[1]:
            shown = f"{ratio:.3f}"
        return (
            f"GloFND flagged {shown} x fnd.alpha={self.alpha:g} of the negatives over the "
            f"last epoch of masking (calibrated: {CALIBRATED[0]:g}-{CALIBRATED[1]:.2f} x): {why}"
        )

    def state_dict(self) -> dict:
        return {
            **super().state_dict(),
            "offsets": dict(self.offsets),
            "shared": dict(self.shared),
            "streak": self.streak,
            "epoch_counts": list(self.epoch_counts),
            "warned": self.warned,
        }

    def load_state_dict(self, state: dict) -> None:
        """Every value checked before any is used: an offset within ``[-2, 2]`` (a similarity
        less a threshold), a shared threshold within ``[-1, 1]``, finite counts."""
        loaded: dict[str, dict[str, float | None]] = {}
        for key, bound in (("offsets", 2.0), ("shared", 1.0)):
            values = state.get(key, {}) if isinstance(state, dict) else None
            if not isinstance(values, dict):
                raise ValueError(f"detector state {key} is not a mapping")
            loaded[key] = {}
            for t in self.anchor_types:
                v = values.get(t)
                if v is not None and (not isinstance(v, (int, float)) or isinstance(v, bool)):
                    raise ValueError(f"detector state {key}.{t}={v!r} is not a number")
                if v is not None and not (math.isfinite(v) and abs(v) <= bound):
                    raise ValueError(
                        f"detector state {key}.{t}={v!r} is not a finite number in "
                        f"[-{bound:g}, {bound:g}]"
                    )
                loaded[key][t] = None if v is None else float(v)
        streak = state.get("streak", 0)
        if not isinstance(streak, int) or isinstance(streak, bool) or streak < 0:
            raise ValueError(f"detector state streak={streak!r} is not an integer >= 0")
        counts = state.get("epoch_counts", [0.0, 0.0])
        if not (
            isinstance(counts, list)
            and len(counts) == 2
            and all(isinstance(x, (int, float)) and math.isfinite(x) and x >= 0 for x in counts)
        ):
            raise ValueError(f"detector state epoch_counts={counts!r} is not two counts >= 0")
        super().load_state_dict(state)
        self.offsets.update(loaded["offsets"])
        self.shared.update(loaded["shared"])
        self.streak = streak
        self.epoch_counts = [float(x) for x in counts]
        self.warned = bool(state.get("warned", False))

    def state_metrics(self) -> dict[str, float]:
        """For the log line: the effective thresholds' quantiles (offset included), the
        offsets, whether masking is on, and the flagged share over the steps since the last
        line (as a share and as a multiple of alpha)."""
        out: dict[str, float] = {}
        for t in self.anchor_types:
            out.update(self.threshold_quantiles(t))
            if self.offsets[t] is not None:
                out[f"offset_{t}"] = self.offsets[t]
        flagged, negatives = self._window_counts
        self._window_counts = [0.0, 0.0]
        if negatives:
            out["flagged_share"] = flagged / negatives
            out["flagged_over_alpha"] = flagged / negatives / self.alpha
        out["masking"] = float(self.masked_from is not None)
        return out

    def thresholds(self, anchor_type: str, index: torch.Tensor) -> torch.Tensor:
        return self.tables.rows(f"glofnd.lambda_{anchor_type}", index)

    def table_names(self) -> tuple[str, ...]:
        return tuple(
            f"glofnd.{kind}_{t}"
            for t in self.anchor_types
            for kind in ("lambda", "m", "v", "count")
        )

    def unseen_value(self, name: str, train: StateTables) -> float | None:
        """The median of the table over the training samples whose threshold has learned
        (updated at least once; all of them when none has): a typical training sample's."""
        t = name.rsplit("_", 1)[1]
        col = train[name]
        seen = train[f"glofnd.count_{t}"] > 0
        vals = col[seen] if bool(seen.any()) else col
        return float(vals.float().median()) if vals.numel() else 0.0

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
        adam_steps = count - 1 if self.init != "constant" else count  # a start is no step
        t_corr = (
            adam_steps.clamp(min=1)
            if self.bias_correction == "sample"
            else torch.full_like(count, epoch + 1.0)
        )
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
        vals = lam[seen] + (self.offsets.get(anchor_type) or 0.0)
        if vals.numel() == 0:
            return {}
        if vals.numel() > max_rows:
            step = vals.numel() // max_rows
            vals = vals[::step][:max_rows]
        q = torch.quantile(vals.float(), torch.tensor(qs, device=vals.device))
        return {
            f"lambda_{anchor_type}_q{int(p * 100):02d}": float(v) for p, v in zip(qs, q.tolist())
        }
