"""Learning-rate schedules, one factor per optimiser step, as open_clip's trainer computes them.

Step ``s`` (0-based: the number of optimiser steps already taken) runs at ``base_lr * f(s)``:

    warmup  (s < W):  f(s) = (s + 1) / W           # the first step already learns: 1/W, not 0
    cosine  (s >= W): f(s) = 1/2 (1 + cos(pi (s - W) / (T - W)))
    constant(s >= W): f(s) = 1

``W`` = ``optim.warmup_steps`` (at most ``T``), ``T`` = the run's optimiser steps. This is
open_clip's ``_warmup_lr`` and ``cosine_lr``; transformers' schedules start warmup at 0, so
their first step would not move the weights.

FastCLIP-v3's temperature group follows ``loss.tau_schedule``:
- ``model``: the model's schedule (warmup, then cosine or constant), scaled to ``loss.tau_lr``;
- ``fastclip``: as FastCLIP's reference code schedules it: ``loss.tau_lr``, no warmup, no
  decay, and a third of it while ``tau <= 0.03`` (re-evaluated before every optimiser step,
  so it returns to ``loss.tau_lr`` if ``tau`` rises above 0.03 again).
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
from torch.optim.lr_scheduler import LambdaLR

if TYPE_CHECKING:
    from data_pipelines.loader import ShardStream

    from ..methods import TemperaturePolicy

TAU_THRESHOLD = 0.03  # FastCLIP's step_thresh rule: below this tau ...
TAU_LR_RATIO = 1.0 / 3.0  # ... the temperature learns at a third of loss.tau_lr


def lr_factor(step: int, warmup: int, total: int, kind: str) -> float:
    """``f(step)`` above. ``kind``: ``cosine`` | ``constant``."""
    if step < warmup:
        return (step + 1) / warmup
    if kind == "constant":
        return 1.0
    decay = total - warmup
    if decay <= 0:
        return 1.0
    return 0.5 * (1.0 + math.cos(math.pi * min(step - warmup, decay) / decay))


def build_scheduler(
    optimizer: torch.optim.Optimizer,
    *,
    kind: str,
    warmup: int,
    total: int,
    tau_group: int | None = None,
    tau_schedule: str = "model",
) -> LambdaLR:
    """One ``LambdaLR`` for every parameter group. The temperature group (index ``tau_group``)
    is constant under ``tau_schedule="fastclip"`` (the 0.03 rule is ``apply_tau_rule``)."""
    warmup = min(warmup, total)

    def model_factor(step: int) -> float:
        return lr_factor(step, warmup, total, kind)

    def constant(step: int) -> float:
        return 1.0

    lambdas = [model_factor] * len(optimizer.param_groups)
    if tau_group is not None and tau_schedule == "fastclip":
        lambdas[tau_group] = constant
    return LambdaLR(optimizer, lambdas)


def apply_tau_rule(
    optimizer: torch.optim.Optimizer, tau_group: int, base_lr: float, tau: float
) -> float:
    """FastCLIP's rule for the temperature's learning rate; sets and returns it."""
    lr = base_lr * (TAU_LR_RATIO if tau <= TAU_THRESHOLD else 1.0)
    optimizer.param_groups[tau_group]["lr"] = lr
    return lr


def temperature_lr_before_step(
    optimizer: torch.optim.Optimizer, tau_group: int, policy: TemperaturePolicy, tau: float
) -> None:
    """Before an optimiser step: the temperature group's learning rate under its rule (the
    ``fastclip`` rule at the current ``tau``; the ``model`` rule is the scheduler's)."""
    if policy.lr_rule == "fastclip":
        apply_tau_rule(optimizer, tau_group, policy.group_lr, tau)


def optimizer_steps_in_epoch(stream: ShardStream, epoch: int, accum_steps: int) -> int:
    """Optimiser steps of ``epoch``: whole windows of ``accum_steps`` micro-batches. The
    micro-batches left over at the epoch's end are not used (a step never spans two epochs)."""
    return stream.steps_per_epoch(epoch) // accum_steps
