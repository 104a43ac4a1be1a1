"""GloFND: a learned similarity threshold per anchor that flags global false negatives.

Balmaseda et al., "Discovering Global False Negatives On the Fly for Self-supervised
Contrastive Learning" (ICML 2025, arXiv 2502.20612). docs/methods.md, "GloFND".

Anchor ``n`` owns ``lambda_n``, the ``(1 - alpha)``-quantile of its similarities to the whole
dataset, learned from mini-batches by minimising ``alpha * l + mean_j (s_nj - l)_+``::

    g_n = alpha - (1 / (K |N_n|)) sum_k sum_{j in N_n} 1[s^k_nj > lambda_n]
    m_n <- beta1 m_n + (1 - beta1) g_n ;  v_n <- beta2 v_n + (1 - beta2) g_n^2
    lambda_n <- clamp(lambda_n - lr * mhat_n / (sqrt(vhat_n) + 1e-8), -1, 1)

(``fnd.optimizer=adam``; ``sgd``: ``lambda_n <- lambda_n - lr * g_n``) with the bias correction
counted per sample (``c_n`` updates so far), or, with
``bias_correction="epoch"``, by the absolute epoch (``t = epoch + 1``) as the reference code
does (the two agree only when updates start at epoch 0 and every sample is seen once an epoch). ``K`` is the number of
similarity rows an anchor has: 1 per modality (bimodal), 2 (the two views, unimodal).
Negatives above the threshold are flagged: ``F_n = {j in N_n : s_nj > lambda_n}``.

``fnd.optimizer=quantile`` (the default where a similarity row expects a flag) moves a
threshold straight toward the visit's own estimate of the anchor's quantile,
``hat q_n`` (``visit_quantile``: the value of expected exceedance alpha among the row's
negatives), ``lambda_n <- lambda_n + w_n (hat q_n - lambda_n)``, ``w_n = max(1 / c_n, w)``:
the mean of the visits so far, then an exponential average of weight ``w``
(``fnd.quantile_weight``). A visit's row holds ``alpha (n + 1)`` flags in expectation; the Adam
step reads only whether each was above, the estimate reads where they lie.

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
OPTIMIZERS = ("auto", "quantile", "adam", "sgd")
# start_mask=auto: the anchors' own flagged shares may spread at most this much (relative
# standard deviation, binomial noise removed; ``anchor_spread``) for flags to be used: anchors
# that flag between none and twice alpha of their negatives spread about 0.6-0.9; one threshold
# for anchors whose similarities differ (a long tail of concepts), 1.5-2
SPREAD_READY = 1.0
OFFSET_BOUND = 100.0  # a saved offset beyond this is refused (a drift sum stays within a few)
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


def visit_quantile(sims: torch.Tensor, neg: torch.Tensor, alpha: float, k: int) -> torch.Tensor:
    """``[b]`` float64: each row's estimate of its anchor's ``(1 - alpha)`` quantile from its
    negatives, the value with expected exceedance alpha: of ``n`` negatives drawn from a
    continuous distribution the ``r``-th largest has ``r / (n + 1)`` of the distribution above
    it in expectation, so the estimate is the ``alpha (n + 1)``-th largest, interpolated linearly
    between order statistics (``torch.quantile``'s position ``(n - 1)(1 - alpha)`` puts about
    ``alpha (n - 1) + 1`` above it: 1.4 x alpha at 127 negatives). The mean over a sample's ``k``
    rows; NaN for a row with ``alpha (n + 1) < 1`` (no order statistic lies that high)."""
    n = neg.sum(1).to(torch.float64)
    r = alpha * (n + 1) - 1  # 0-based position from the top
    lo = r.floor().clamp(min=0)
    frac = (r - lo).unsqueeze(1)
    # only the order statistics up to the deepest row's r + 1 are read: a top-k, not a sort
    # (the values are the similarities themselves, so float64 after the selection is exact)
    depth = min(int(lo.max()) + 2, sims.shape[1]) if lo.numel() else 0
    x = sims.detach().masked_fill(~neg, float("-inf"))
    top = x.topk(depth, dim=1, sorted=True).values.to(torch.float64)
    i = lo.long().clamp(max=max(depth - 1, 0)).unsqueeze(1)
    j = (i + 1).clamp(max=(n.long() - 1).clamp(min=0).unsqueeze(1))
    v = (top.gather(1, i) * (1 - frac) + top.gather(1, j) * frac).squeeze(1)
    v = torch.where((r >= 0) & (n >= 1), v, torch.full_like(v, float("nan")))
    return v.view(k, -1).mean(0)


def spread_terms(
    flags: torch.Tensor, neg: torch.Tensor, alpha: float, k: int, keep: torch.Tensor | None = None
) -> torch.Tensor:
    """``[3]`` float64 sums over a batch's samples (``k`` rows each; those ``keep`` marks) for
    ``anchor_spread``: the squared deviations of each sample's flag count ``c_n`` from
    ``alpha n_n`` (``n_n`` its negatives), their binomial variances ``alpha (1 - alpha) n_n``,
    and ``(alpha n_n)^2``."""
    c = flags.sum(1).to(torch.float64).view(k, -1).sum(0)
    n = neg.sum(1).to(torch.float64).view(k, -1).sum(0)
    if keep is not None:
        c, n = c[keep], n[keep]
    e = alpha * n
    return torch.stack([((c - e) ** 2).sum(), (e * (1 - alpha)).sum(), (e * e).sum()])


def anchor_spread(sums: list[float] | torch.Tensor) -> float | None:
    """The relative standard deviation of the anchors' own flagged shares around alpha, with
    the binomial noise of a batch's counts taken out: ``sqrt(max(0, sum (c - e)^2 - sum
    var) / sum e^2)`` (0: every anchor flags alpha of its own negatives; a single threshold
    for anchors whose similarities differ spreads far more). None without data."""
    dev, var, e2 = (float(x) for x in sums)
    if e2 <= 0:
        return None
    return math.sqrt(max(0.0, dev - var) / e2)


class GloFND(Detector):
    """Per-sample thresholds for each anchor type.

    Args:
        tables: the per-sample tables; four are added per anchor type ``t``:
            ``glofnd.lambda_t``, ``glofnd.m_t``, ``glofnd.v_t``, ``glofnd.count_t``.
        anchor_types: ``("img", "txt")`` bimodal (image anchors vs texts, text anchors vs
            images), ``("view",)`` unimodal (both views of an image share one threshold).
        alpha: share of the dataset above each threshold, in (0, 1).
        lr, optimizer ("auto" | "quantile" | "adam" | "sgd"), beta1, beta2, init_threshold,
            quantile_weight: the update rule (``auto`` resolves in ``check_batch``).
        queue: columns of the last global batches a visit's estimate also reads (quantile
            rule; 0: the batch only).
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
            ``CALIBRATED`` of alpha (None: one epoch's steps), the time constant of the
            anchors' spread it also waits on (``anchor_spread`` at most ``SPREAD_READY``).
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
        quantile_weight: float = 0.5,
        queue: int = 0,
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
        if optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
        if not 0 < quantile_weight <= 1:
            raise ValueError(f"quantile_weight must be in (0, 1], got {quantile_weight}")
        self.quantile_weight = quantile_weight
        if queue < 0:
            raise ValueError(f"queue must be >= 0, got {queue}")
        self.queue_size = queue
        self.needs_features = queue > 0
        # the columns of the last global batches, newest first: features and dataset indices
        self.queue: dict[str, torch.Tensor | None] = {t: None for t in anchor_types}
        self.queue_ids: dict[str, torch.Tensor | None] = {t: None for t in anchor_types}
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
        # start_mask=auto: exponentially weighted sums over about a window of steps of the
        # anchors' squared flag-count deviations, their binomial variances and squared means
        self.spread_sums = [0.0, 0.0, 0.0]
        self.row_negatives: int | None = None  # negatives of a similarity row (check_batch)
        self._window_counts = [0.0, 0.0]  # since the last log line (not checkpointed)
        self._pending: dict[str, float] = {}  # this step's offsets / shared thresholds
        self._pending_queue: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

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
            quantile_weight=fnd.quantile_weight,
            queue=fnd.queue,
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
        one_per_row = self.alpha * (negatives_per_row + 1) >= 1
        estimable = self.alpha * (negatives_per_row + self.queue_size + 1) >= 1
        if self.optimizer == "quantile" and not estimable:
            raise ValueError(
                f"fnd.optimizer=quantile estimates each anchor's quantile from its "
                f"{negatives_per_row} negatives in a global batch and fnd.queue="
                f"{self.queue_size} more, which needs fnd.alpha >= "
                f"1/{negatives_per_row + self.queue_size + 1} (at least one flag per row in "
                f"expectation), got {self.alpha:g}: use fnd.optimizer=auto or adam, or a "
                "larger fnd.queue or data.batch_size"
            )
        if self.optimizer == "auto":
            self._resolve_auto(negatives_per_row)
            log.info(
                "GloFND: thresholds learn with fnd.optimizer=%s (alpha x (negatives + queue + "
                "1) = %.3g flags per similarity row %s 1)",
                self.optimizer,
                self.alpha * (negatives_per_row + self.queue_size + 1),
                ">=" if estimable else "<",
            )
        if self.alpha * total < 1:
            raise ValueError(
                f"fnd.alpha={self.alpha:g} asks for less than one flagged negative in a global "
                f"batch ({total} negatives per anchor type): the smallest share a batch can "
                f"flag is 1/{total} = {1 / total:.3g}; raise fnd.alpha to at least that, or "
                f"data.batch_size until a global batch holds 1/alpha = {1 / self.alpha:.3g} "
                "negatives or more"
            )
        if self.init == "quantile" and not one_per_row:
            log.info(
                "GloFND: fnd.alpha=%g is below 1/%d, one flag in an anchor's %d negatives of a "
                "global batch: a first visit's threshold starts at the quantile over the whole "
                "global batch (as fnd.init=shared), not at the anchor's own",
                self.alpha,
                negatives_per_row + 1,
                negatives_per_row,
            )

    def _resolve_auto(self, negatives_per_row: int) -> None:
        """``fnd.optimizer=auto``: the quantile rule where a row, with the queue, expects a
        flag; Adam below that, and under a constant start (the paper's rule)."""
        estimable = self.alpha * (negatives_per_row + self.queue_size + 1) >= 1
        self.optimizer = "quantile" if estimable and self.init != "constant" else "adam"

    def plan(self, total_steps: int, steps_per_epoch: int) -> None:
        super().plan(total_steps, steps_per_epoch)
        if self.window is None:
            self.window = max(1, steps_per_epoch)

    def updating(self, epoch: int) -> bool:
        return epoch >= self.start_update

    def ready_to_mask(self) -> bool:
        """``auto``: the flagged share has stayed calibrated for a window of steps, and the
        anchors' own flagged shares spread at most ``SPREAD_READY`` around alpha over it
        (``anchor_spread``): per anchor, not only over the batch."""
        if self.window is None or self.streak < self.window:
            return False
        spread = anchor_spread(self.spread_sums)
        return spread is not None and spread <= SPREAD_READY

    def detect(self, inp: DetectionInput) -> Detection:
        """Flags from the thresholds before this step's update (once masking has started),
        and the update's new rows from the same flags (from ``start_update`` on). A sample
        seen for the first time under ``init`` quantile or shared gets its threshold from
        this step (flags included), and no update.

        A threshold ``theta_n = lambda_n + offset`` is a similarity, clamped to ``[-1, 1]``; a
        stored ``lambda_n`` is written so that ``lambda_n + offset`` lies there at this step."""
        masking = inp.inference or self.masking(inp.epoch)
        updating = self.updating(inp.epoch) and not inp.inference
        found = Detection({t: None for t in self.anchor_types})
        if not (masking or updating):
            return found
        k, b = inp.rows_per_sample, inp.index.numel()
        if self.optimizer == "auto" and updating:  # check_batch was not called: this batch's
            self._resolve_auto(next(iter(inp.sims.values())).shape[1] - 1)
        for t in self.anchor_types:
            sims = inp.sims[t]
            neg = negatives(sims, inp.pos, inp.not_negative)
            dev = sims.device
            lam = self.thresholds(t, inp.index).to(dev)
            fresh = torch.zeros_like(lam, dtype=torch.bool)
            if self.init != "constant":
                fresh = (self.tables.rows(f"glofnd.count_{t}", inp.index) == 0).to(dev)
            # a row's own estimate needs alpha x (its negatives + 1) >= 1: the batch's columns
            # and the queue's (the same count on every process, so is the choice)
            queued = 0 if self.queue[t] is None else self.queue[t].shape[0]
            own_start = self.alpha * (sims.shape[1] + queued) >= 1
            shared = None
            if self.init == "shared" or (self.init == "quantile" and not own_start):
                shared = self._shared(t, sims, neg, inp)
            offset = self._offset(t, sims, lam, neg, fresh.repeat(k), inp)
            q = None  # each row's visit estimate, computed once for a start, update and gap
            if bool(fresh.any()):  # theta = the start value, stored less this step's offset
                if shared is None:
                    q = self._estimate(t, sims, neg, k, inp)
                if shared is not None:
                    start = torch.full_like(lam, shared)
                else:  # a row without an estimate (too few negatives) keeps its value
                    start = torch.where(torch.isnan(q.to(dev)), lam + offset, q.to(dev))
                lam = torch.where(fresh, self._bounded(start, offset), lam)
            theta = (lam + offset).clamp(-1.0, 1.0).to(sims.dtype)
            flags = (sims > theta.repeat(k)[:, None]) & neg
            if masking:
                found.flags[t] = flags
            if updating:
                if self.optimizer == "quantile":
                    if q is None:
                        q = self._estimate(t, sims, neg, k, inp)
                    rows = self.update_toward(t, inp.index, lam, q.to(dev), offset)
                else:
                    rows = self.update_from_flags(
                        t, inp.index, list(flags.split(b)), inp.num_negatives, inp.epoch, offset
                    )
                if bool(fresh.any()):  # the start value, no update at a first visit
                    rows[f"glofnd.lambda_{t}"] = torch.where(fresh, lam, rows[f"glofnd.lambda_{t}"])
                    if shared is None and q is not None:  # no estimate: not a visit yet
                        count = rows[f"glofnd.count_{t}"]
                        unset = fresh & torch.isnan(q.to(dev))
                        rows[f"glofnd.count_{t}"] = torch.where(
                            unset, torch.zeros_like(count), count
                        )
                    for key in (f"glofnd.m_{t}", f"glofnd.v_{t}"):
                        if key in rows:
                            rows[key] = torch.where(fresh, torch.zeros_like(rows[key]), rows[key])
                found.rows.update(rows)
                found.stats[f"glofnd.flagged_{t}"] = torch.stack([flags.sum(), neg.sum()]).to(
                    torch.float64
                )
                # the anchors that flag by a learned threshold (a start flags its own batch
                # quantile: calibrated by construction)
                found.stats[f"glofnd.spread_{t}"] = spread_terms(
                    flags, neg, self.alpha, k, keep=~fresh
                )
            if updating and self.queue_size and inp.features is not None:
                self._push(t, inp)
            if inp.measure:
                if q is None:
                    q = visit_quantile(sims, neg, self.alpha, k).to(torch.float32)
                gap = theta.to(torch.float64) - q.to(dev, torch.float64)
                if bool(torch.isfinite(gap).any()):
                    found.metrics[f"fnd/threshold_gap_{t}"] = float(gap.nanmean())
        return found

    def _estimate(
        self, t: str, sims: torch.Tensor, neg: torch.Tensor, k: int, inp: DetectionInput
    ) -> torch.Tensor:
        """``[b]`` float32: each sample's visit estimate (``visit_quantile``) over its batch
        negatives and the queue's columns (less any column of its own sample)."""
        queued = self.queue[t]
        if not self.queue_size or queued is None or inp.features is None:
            return visit_quantile(sims, neg, self.alpha, k).to(torch.float32)
        anchors = inp.features[t][0]
        if queued.device != anchors.device:  # a resumed queue, read on the CPU: moved once
            queued = self.queue[t] = queued.to(anchors.device)
            self.queue_ids[t] = self.queue_ids[t].to(anchors.device)
        bank = anchors.to(queued.dtype) @ queued.T
        ids = self.queue_ids[t].to(anchors.device)
        bank_neg = ids[None, :] != inp.index.to(anchors.device).repeat(k)[:, None]
        both = torch.cat([sims.to(bank.dtype), bank], 1)
        return visit_quantile(both, torch.cat([neg, bank_neg], 1), self.alpha, k).to(torch.float32)

    @torch.no_grad()
    def _push(self, t: str, inp: DetectionInput) -> None:
        """The step's columns (the global batch's, the same on every process) go to the front
        of the queue; the oldest beyond ``queue_size`` leave it."""
        cols = inp.features[t][1].detach().to(torch.float32)
        ids = inp.column_ids
        if ids is None or ids.numel() != cols.shape[0]:
            raise RuntimeError("GloFND's queue needs every column's dataset index")
        if not bool(torch.isfinite(cols).all()):  # a step about to be skipped keeps nothing
            return
        # micro-batches of one step: each adds to what the step's earlier ones added
        old, old_ids = self._pending_queue.get(t, (self.queue[t], self.queue_ids[t]))
        if old is not None:
            cols = torch.cat([cols, old.to(cols.device)])
            ids = torch.cat([ids.to(cols.device), old_ids.to(cols.device)])
        self._pending_queue[t] = (cols[: self.queue_size], ids[: self.queue_size].to(torch.long))

    @staticmethod
    def _bounded(value: torch.Tensor, offset: float) -> torch.Tensor:
        """A stored threshold for the effective ``value``: ``value - offset``, within the
        range that keeps ``lambda + offset`` in ``[-1, 1]``."""
        return (value - offset).clamp(-1.0 - offset, 1.0 - offset)

    def _offset(
        self,
        t: str,
        sims: torch.Tensor,
        lam: torch.Tensor,
        neg: torch.Tensor,
        fresh: torch.Tensor,
        inp: DetectionInput,
    ) -> float:
        """This step's offset of anchor type ``t`` (0 without ``offset``): the last step's
        offset plus the ``(1 - alpha)`` quantile of ``s - theta`` over the global batch's
        negatives of anchors whose threshold is already set, ``theta`` each threshold under
        the last offset, clamped to ``[-1, 1]`` (so every value lies in the histogram's
        ``[-2, 2]``). The last step's offset when there are none, and outside training."""
        if not self.offset:
            return 0.0
        last = self.offsets[t] if self.offsets[t] is not None else 0.0
        if inp.inference:
            return last
        k = sims.shape[0] // lam.shape[0]
        theta = (lam.to(torch.float64) + last).clamp(-1.0, 1.0)
        residual = sims.to(torch.float64) - theta.repeat(k)[:, None]
        counts = distributed.all_reduce_sum(histogram(residual, neg & ~fresh[:, None]))
        q = upper_quantile(counts, self.alpha)
        value = last if q is None else last + q
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
        for t, (cols, ids) in self._pending_queue.items():
            self.queue[t], self.queue_ids[t] = cols, ids
        self._pending_queue = {}
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
        spreads = [
            stats[f"glofnd.spread_{t}"] for t in self.anchor_types if f"glofnd.spread_{t}" in stats
        ]
        if spreads:  # exponentially weighted over about a window of steps
            keep = 1.0 - 1.0 / max(1, self.window or 1)
            step_sums = [float(x) for x in sum(spreads)]
            self.spread_sums = [keep * a + x for a, x in zip(self.spread_sums, step_sums)]
        total = sum(counts)
        self._window_counts = [a + float(x) for a, x in zip(self._window_counts, total)]
        if masked:
            self.epoch_counts = [a + float(x) for a, x in zip(self.epoch_counts, total)]
        if "fnd/mask_start_step" in out:
            spread = anchor_spread(self.spread_sums)
            log.info(
                "GloFND: masking starts at step %d (%s; flagged share %.2f x fnd.alpha at the "
                "step before, the anchors' own shares spread %s around it)",
                self.steps,
                self.mask_start,
                sum(ratios) / len(ratios),
                "-" if spread is None else f"{spread:.2f}",
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
            "spread_sums": list(self.spread_sums),
        }

    def load_state_dict(self, state: dict) -> None:
        """Every value checked before any is used: an offset within ``[-100, 100]`` (a running
        sum of the similarities' drift, a few units over any run; a stored threshold is
        relative to it), a shared threshold within ``[-1, 1]``, finite counts."""
        loaded: dict[str, dict[str, float | None]] = {}
        for key, bound in (("offsets", OFFSET_BOUND), ("shared", 1.0)):
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
                        f"detector state {key}.{t}={v!r} is not a finite number"
                        + (f" in [-{bound:g}, {bound:g}]" if math.isfinite(bound) else "")
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
        sums = state.get("spread_sums", [0.0, 0.0, 0.0])
        if not (
            isinstance(sums, list)
            and len(sums) == 3
            and all(
                isinstance(x, (int, float))
                and not isinstance(x, bool)
                and math.isfinite(x)
                and x >= 0
                for x in sums
            )
        ):
            raise ValueError(f"detector state spread_sums={sums!r} is not three sums >= 0")
        super().load_state_dict(state)
        self.offsets.update(loaded["offsets"])
        self.shared.update(loaded["shared"])
        self.streak = streak
        self.epoch_counts = [float(x) for x in counts]
        self.spread_sums = [float(x) for x in sums]
        self.warned = bool(state.get("warned", False))

    def tensor_state(self) -> dict[str, torch.Tensor]:
        """The queue (``queue_t``: features, ``queue_ids_t``: dataset indices), for
        ``detector.safetensors``; nothing without one."""
        out = {}
        for t in self.anchor_types:
            if self.queue[t] is not None:
                out[f"queue_{t}"] = self.queue[t]
                out[f"queue_ids_{t}"] = self.queue_ids[t]
        return out

    def load_tensor_state(self, tensors: dict[str, torch.Tensor]) -> None:
        """What ``tensor_state`` gave, every tensor checked before any is used: known names,
        features ``[q, d]`` with ``q <= queue_size``, finite, with as many indices >= 0."""
        known = {f"{kind}_{t}" for t in self.anchor_types for kind in ("queue", "queue_ids")}
        unknown = sorted(set(tensors) - known)
        if unknown:
            raise ValueError(f"unknown tensors {unknown} (not {self.name}'s)")
        loaded = {}
        for t in self.anchor_types:
            f, ids = tensors.get(f"queue_{t}"), tensors.get(f"queue_ids_{t}")
            if f is None and ids is None:
                continue
            if f is None or ids is None:
                raise ValueError(f"queue_{t} and queue_ids_{t} come together")
            if f.dim() != 2 or not f.is_floating_point() or not 0 < f.shape[0] <= self.queue_size:
                raise ValueError(
                    f"queue_{t} is {tuple(f.shape)} {f.dtype}, not at most {self.queue_size} "
                    "feature rows (fnd.queue)"
                )
            if not bool(torch.isfinite(f).all()):
                raise ValueError(f"queue_{t} holds values that are not finite")
            if ids.shape != (f.shape[0],) or ids.is_floating_point() or bool((ids < 0).any()):
                raise ValueError(
                    f"queue_ids_{t} is not one dataset index >= 0 per row of queue_{t}"
                )
            loaded[t] = (f.to(torch.float32), ids.to(torch.long))
        for t, (f, ids) in loaded.items():
            self.queue[t], self.queue_ids[t] = f, ids

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
        spread = anchor_spread(self.spread_sums)
        if spread is not None:
            out["anchor_spread"] = spread
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
        offset: float = 0.0,
    ) -> dict[str, torch.Tensor]:
        """As ``update``, from flags already computed with the current thresholds (the
        training step reuses the flags of its false-negative masks). The new thresholds are
        clamped so that with ``offset`` they lie in ``[-1, 1]``."""
        t = anchor_type
        dev = flags[0].device
        lam = self.tables.rows(f"glofnd.lambda_{t}", index, dev)
        g = self.gradient(flags, num_negatives)
        count = self.tables.rows(f"glofnd.count_{t}", index, dev) + 1
        if self.optimizer == "sgd":
            new_lam = (lam - self.lr * g).clamp(-1.0 - offset, 1.0 - offset)
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
        new_lam = (lam - self.lr * mhat / (torch.sqrt(vhat) + EPS)).clamp(
            -1.0 - offset, 1.0 - offset
        )
        return {
            f"glofnd.lambda_{t}": new_lam,
            f"glofnd.m_{t}": m,
            f"glofnd.v_{t}": v,
            f"glofnd.count_{t}": count,
        }

    @torch.no_grad()
    def update_toward(
        self,
        anchor_type: str,
        index: torch.Tensor,
        lam: torch.Tensor,
        estimate: torch.Tensor,
        offset: float,
    ) -> dict[str, torch.Tensor]:
        """``fnd.optimizer=quantile``: each threshold moves toward its visit's estimate
        (``visit_quantile``, a similarity) less this step's offset, by ``max(1 / c_n,
        quantile_weight)`` (``c_n`` counting this visit); a row without an estimate stays."""
        t = anchor_type
        count = self.tables.rows(f"glofnd.count_{t}", index, lam.device) + 1
        w = torch.clamp(1.0 / count, min=self.quantile_weight)
        target = self._bounded(estimate.to(lam.dtype), offset)
        new_lam = torch.where(torch.isnan(target), lam, lam + w * (target - lam))
        return {f"glofnd.lambda_{t}": new_lam, f"glofnd.count_{t}": count}

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
