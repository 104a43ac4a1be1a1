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
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .. import distributed
from ..config import Config
from .objective import StepOutput
from .schedule import apply_tau_rule

if TYPE_CHECKING:
    from .loop import Setup

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


def optimizer_step(cfg: Config, s: Setup, batches, epoch: int, logged: bool) -> StepResult:
    """One optimiser step over ``optim.accum_steps`` micro-batches of ``batches``.

    With ``optim.accum_mode=cached`` (the default) the micro-batches form one batch: features
    cached without gradients, then a forward with gradients per micro-batch and the loss over
    the whole window (``Objective.accumulated``). With ``independent``, each micro-batch is
    its own batch: forward, objective, backward of the mean over micro-batches. Either way a
    finite check agreed by every rank precedes each backward, and DDP synchronises on the
    last backward only. Then the
    clipped gradient-norm check and the update. The per-sample rows every micro-batch
    computed are held and committed in one write only when the update is really taken: a
    skipped step (non-finite loss in any micro-batch, non-finite gradient, fp16 overflow)
    leaves the weights and every table exactly as they were.
    """
    acc, model, k = s.accelerator, s.model, cfg.optim.accum_steps
    window = []
    for _ in range(k):  # the whole window first: every rank agrees that it is there
        batch = next(batches, None)
        if not distributed.all_true(batch is not None, acc.device):
            # some rank ran out of data: every rank drops the window
            s.optimizer.zero_grad(set_to_none=True)
            return StepResult("no_data")
        window.append(batch)

    def all_finite(loss: torch.Tensor) -> bool:
        # every rank takes the same branch: no rank waits alone in a backward collective
        return distributed.all_true(bool(torch.isfinite(loss)), acc.device)

    def sync(last: bool):
        return contextlib.nullcontext() if last else acc.no_sync(model)

    held: list[StepOutput] = []
    if k > 1 and cfg.optim.accum_mode == "cached":
        out = s.objective.accumulated(
            model, window, acc.device, epoch, logged, acc.backward, sync, all_finite
        )
        held = [out] if out is not None else []
    else:  # one micro-batch, or independent micro-batches (negatives within each)
        for micro, batch in enumerate(window):
            with sync(micro == k - 1):
                res = s.objective.batch_loss(model, batch, acc.device, epoch, measure=logged)
                if not all_finite(res.loss.detach()):
                    held = []
                    break
                acc.backward(res.loss / k)
                held.append(res)
    if not held:
        s.optimizer.zero_grad(set_to_none=True)
        return StepResult("skipped")
    # the gradients are synchronised, so every rank sees the same norm; a gradient scaler
    # (fp16) handles overflowing gradients itself and says so through step_was_skipped
    norm = acc.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip or math.inf)
    if acc.scaler is None and not bool(torch.isfinite(norm)):
        s.optimizer.zero_grad(set_to_none=True)
        return StepResult("skipped")
    method = s.objective.method
    if s.tau_group is not None and method.temperature_schedule == "fastclip":
        tau = 1.0 / acc.unwrap_model(model).logit_scale.detach().exp().item()
        apply_tau_rule(s.optimizer, s.tau_group, method.temperature_lr, tau)
    s.optimizer.step()
    s.optimizer.zero_grad(set_to_none=True)
    losses, lrs = [r.loss.detach() for r in held], [g["lr"] for g in s.optimizer.param_groups]
    if acc.optimizer_step_was_skipped:
        return StepResult("overflow", losses, held, lrs)
    events = s.objective.commit(held)  # per-sample tables change only with the weights
    s.scheduler.step()
    return StepResult("taken", losses, held, lrs, events)


class NonFiniteError(RuntimeError):
    """Too many non-finite steps in a row; the message names the checkpoint to go back to."""


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
