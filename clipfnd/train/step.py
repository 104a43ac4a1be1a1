"""One optimiser step of the training recipe, and what happens when steps go wrong.

``optimizer_step`` runs ``optim.accum_steps`` micro-batches (forward, objective, a finite
check every rank agrees on, backward), then the clipped update, and commits the per-sample
rows of every micro-batch only when the update is really taken. ``FaultCounter`` counts the
steps skipped for non-finite values and stops the run after too many in a row.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path

import torch
from accelerate import Accelerator

from .. import distributed
from ..config import Config
from ..errors import NonFiniteError
from ..methods import TemperaturePolicy
from .objective import Objective, StepOutput
from .schedule import temperature_lr_before_step

__all__ = ["FaultCounter", "NonFiniteError", "StepResult", "cached_window", "optimizer_step"]

log = logging.getLogger("clipfnd.train")


@dataclasses.dataclass
class StepResult:
    """What one optimiser step did.

    ``status``: ``taken`` (weights and per-sample tables changed), ``skipped`` (a non-finite
    loss or gradient: nothing changed), ``overflow`` (the fp16 gradient scaler skipped the
    update: nothing changed but the scale), ``no_data`` (a rank ran out of data before the
    window was full: the partial window is dropped, nothing changed).
    """

    status: str
    losses: list[torch.Tensor] = dataclasses.field(default_factory=list)  # one per micro-batch
    outputs: list[StepOutput] = dataclasses.field(default_factory=list)
    lrs: list[float] = dataclasses.field(default_factory=list)  # of each parameter group, as used
    events: dict[str, float] = dataclasses.field(default_factory=dict)  # the detector's, once


def optimizer_step(
    batches,
    *,
    accelerator: Accelerator,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler,
    objective: Objective,
    accum_steps: int,
    cached: bool,
    grad_clip: float | None,
    temperature: TemperaturePolicy,
    tau_group: int | None,
    epoch: int,
    logged: bool,
) -> StepResult:
    """One optimiser step over ``accum_steps`` micro-batches of ``batches``.

    ``cached`` (``optim.accum_mode=cached``, the default): the micro-batches form one batch
    (``cached_window``). Otherwise each micro-batch is its own batch: forward, objective,
    backward of the mean over micro-batches. Either way a finite check agreed by every rank
    precedes each backward, and DDP synchronises on the last backward only. Then the clipped
    gradient-norm check, the temperature's learning-rate rule and the update. The per-sample
    rows every micro-batch computed are held and committed in one write only when the update
    is really taken: a skipped step (non-finite loss in any micro-batch, non-finite gradient,
    fp16 overflow) leaves the weights and every table exactly as they were. ``logged``: the
    step's metrics are logged (detection quality is counted).
    """
    acc, k = accelerator, accum_steps
    window = []
    for _ in range(k):  # the whole window first: every rank agrees that it is there
        batch = next(batches, None)
        if not distributed.all_true(batch is not None, acc.device):
            # some rank ran out of data: every rank drops the window
            optimizer.zero_grad(set_to_none=True)
            return StepResult("no_data")
        window.append(batch)
    if k > 1 and cached:
        out = cached_window(
            objective,
            model,
            window,
            acc.device,
            epoch,
            logged,
            acc.backward,
            lambda last: _sync(acc, model, last),
            lambda loss: _all_finite(acc, loss),
        )
        held = [out] if out is not None else []
    else:  # one micro-batch, or independent micro-batches (negatives within each)
        held = independent_window(acc, model, objective, window, epoch, logged)
    if not held:
        optimizer.zero_grad(set_to_none=True)
        return StepResult("skipped")
    # the gradients are synchronised, so every rank sees the same norm; a gradient scaler
    # (fp16) handles overflowing gradients itself and says so through step_was_skipped
    norm = acc.clip_grad_norm_(model.parameters(), grad_clip or math.inf)
    if acc.scaler is None and not bool(torch.isfinite(norm)):
        optimizer.zero_grad(set_to_none=True)
        return StepResult("skipped")
    if tau_group is not None:
        logit_scale = distributed.temperature(acc.unwrap_model(model).logit_scale)
        tau = 1.0 / logit_scale.detach().exp().item()
        temperature_lr_before_step(optimizer, tau_group, temperature, tau)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    temperature.clamp(acc.unwrap_model(model).logit_scale)
    losses, lrs = [r.loss.detach() for r in held], [g["lr"] for g in optimizer.param_groups]
    if acc.optimizer_step_was_skipped:
        return StepResult("overflow", losses, held, lrs)
    events = objective.commit(held)  # per-sample tables change only with the weights
    scheduler.step()
    return StepResult("taken", losses, held, lrs, events)


def cached_window(
    objective: Objective,
    model: torch.nn.Module,
    batches: list[dict],
    device: torch.device,
    epoch: int,
    logged: bool,
    backward: Callable[[torch.Tensor], None],
    sync: Callable[[bool], AbstractContextManager],
    all_finite: Callable[[torch.Tensor], bool],
) -> StepOutput | None:
    """One optimiser step's loss and gradients over ``k = len(batches)`` micro-batches, as if
    they were one batch (open_clip's ``--accum-freq``): the loss, the detector's flags and
    updates and the method's estimators all see the whole accumulated batch.

    A forward without gradients caches every micro-batch's features; then, micro-batch by
    micro-batch, a forward with gradients replaces its cached rows, the loss over the whole
    accumulated batch is computed and backward runs. The sum of the ``k`` backward passes is
    the gradient of the whole batch's loss: each pass carries the gradient through one
    micro-batch's features, and the temperature's (a term that does not go through features)
    only in the last pass, the one whose gradients are synchronised (``sync(last)``: DDP's
    ``no_sync`` for the others). The inputs (the augmented views) are the same tensors in both forwards.
    Returns the last pass's output (its rows are committed by the caller), or None when the
    loss is not finite on some rank (nothing was backpropagated then).
    """
    k = len(batches)
    with torch.no_grad():
        detect = objective.detecting(epoch)
        cached = [objective.features(model, b, device, detect)[0] for b in batches]
    index = torch.cat([b["index"] for b in batches]).to(device)
    label = torch.cat([b["label"] for b in batches]).to(device)
    out = None
    for j, batch in enumerate(batches):
        last = j == k - 1
        with sync(last):
            # what only the detector reads (no gradient) is taken from the cache
            live, logit_scale = objective.features(model, batch, device, detect=False)
            feats = tuple(
                torch.cat([live[c] if i == j and c < len(live) else cached[i][c] for i in range(k)])
                for c in range(len(cached[0]))
            )
            scale = logit_scale if last else logit_scale.detach()
            out = objective.loss_from(feats, scale, index, label, epoch, logged and last)
            if not all_finite(out.loss.detach()):
                return None
            backward(out.loss)
    return out


def independent_window(
    acc: Accelerator,
    model: torch.nn.Module,
    objective: Objective,
    batches: list[dict],
    epoch: int,
    logged: bool,
) -> list[StepOutput]:
    """Each micro-batch its own batch: forward, objective, backward of its share of the mean.
    Returns every micro-batch's output, or nothing when a loss is not finite on some rank."""
    held = []
    for micro, batch in enumerate(batches):
        with _sync(acc, model, micro == len(batches) - 1):
            res = objective.batch_loss(model, batch, acc.device, epoch, measure=logged)
            if not _all_finite(acc, res.loss.detach()):
                return []
            acc.backward(res.loss / len(batches))
            held.append(res)
    return held


def _all_finite(acc: Accelerator, loss: torch.Tensor) -> bool:
    # every rank takes the same branch: no rank waits alone in a backward collective
    return distributed.all_true(bool(torch.isfinite(loss)), acc.device)


def _sync(acc: Accelerator, model: torch.nn.Module, last: bool):
    """DDP synchronises gradients on the last backward of a step only."""
    return contextlib.nullcontext() if last else acc.no_sync(model)


class FaultCounter:
    """Counts optimiser steps skipped for a non-finite loss or gradient."""

    def __init__(self) -> None:
        self.total = 0
        self.in_a_row = 0

    def skip(self, step: int, epoch: int) -> None:
        self.total += 1
        self.in_a_row += 1
        log.warning(
            "non-finite loss or gradient after step %d (epoch %d): step skipped "
            "(%d in a row, %d in all)",
            step,
            epoch,
            self.in_a_row,
            self.total,
        )

    def ok(self) -> None:
        self.in_a_row = 0

    def message(self, cfg: Config, step: int, latest: Path | None) -> str:
        """Why the run stops, and what to do: go back to ``latest``, the newest checkpoint
        from before the fault, or (None: no checkpoint holds finite weights) start over."""
        head = (
            f"{self.in_a_row} optimiser steps in a row had a non-finite loss or gradient "
            f"(train.max_nonfinite_steps={cfg.train.max_nonfinite_steps}) after step {step}; "
            "stopping."
        )
        if latest is None:
            return (
                f"{head} No checkpoint holds finite weights from before the fault (none is "
                "written with non-finite weights): start over with overwrite=true and a lower "
                "optim.lr, or check the data"
            )
        return (
            f"{head} The newest checkpoint from before the fault is {latest}: lower optim.lr or "
            "check the data, then resume with resume=latest (a changed optim.lr is applied on "
            "resume)"
        )
