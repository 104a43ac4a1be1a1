"""``sogclr`` (FastCLIP-v1: constant temperature) and ``fastclip_v3`` (learned temperature):
the global contrastive loss with per-sample ``u`` estimators (docs/methods.md, "Global
contrastive loss"). The formulas are in ``clipfnd.losses.global_contrastive``; these classes
hold the knobs and the tables."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from ..losses import (
    attraction,
    gamma_schedule,
    global_contrastive_loss,
    kept_negatives,
    moving_average,
    negative_ratio,
    temperature_penalty,
    temperature_terms,
)
from .base import AnchorRows, Method, MethodOutput, TemperaturePolicy

if TYPE_CHECKING:
    from ..config import Config
    from ..state import StateTables


class SogCLR(Method):
    """Global contrastive loss at the constant temperature ``loss.tau`` (``logit_scale`` is set
    to ``ln(1/tau)`` and frozen). Tables: ``gcl.u_t`` and ``gcl.visits_t`` per anchor type.

    Unimodal (``K = 2`` rows per image, anchor type ``view``): one ``u_n`` per image. Each view
    ``k`` updates it from its own ratio, ``u^k = (1 - gamma) u_n + gamma g^k`` (used in that
    view's loss), and the table keeps their mean, ``u_n <- mean_k u^k``, as SogCLR's code does.
    """

    name = "sogclr"
    modes = ("clip", "simclr")

    def __init__(self, cfg: Config, tables: StateTables, anchor_types: tuple[str, ...]):
        super().__init__(cfg, tables, anchor_types)
        for t in anchor_types:
            tables.add(f"gcl.u_{t}", 0.0)
            tables.add(f"gcl.visits_{t}", 0.0)

    def temperature_policy(self) -> TemperaturePolicy:
        return TemperaturePolicy(
            math.log(1.0 / self.cfg.loss.tau),
            learned=False,
            max_logit_scale=math.log(1.0 / self.cfg.loss.tau_min),
        )

    def temperature(self, logit_scale: torch.Tensor) -> torch.Tensor:
        return torch.tensor(self.cfg.loss.tau, device=logit_scale.device)

    def temperature_terms(self, u: torch.Tensor, tau: torch.Tensor) -> torch.Tensor | None:
        """Per anchor type, added to the loss with the type's weight (none here)."""
        return None

    def loss(
        self,
        rows: dict[str, AnchorRows],
        index: torch.Tensor,
        logit_scale: torch.Tensor,
        epoch: int,
    ) -> MethodOutput:
        tau = self.temperature(logit_scale)
        c = self.cfg.loss
        gamma = gamma_schedule(epoch, c.gamma_min, c.gamma_decay_epochs)
        weight = 1.0 / len(rows)
        loss = torch.zeros((), device=index.device)
        new_rows: dict[str, torch.Tensor] = {}
        for t, r in rows.items():
            dev = r.pos.device
            sim = r.anchors @ r.others.T  # with gradient
            kept = kept_negatives(
                r.pos, tuple(sim.shape), r.fn_mask, self.removal, dev, not_negative=r.not_negative
            )
            g = negative_ratio(sim, r.pos, tau, kept)
            k = r.anchors.shape[0] // index.numel()  # rows per sample: 1 bimodal, 2 unimodal
            visits = self.tables.rows(f"gcl.visits_{t}", index, dev)
            u_old = self.tables.rows(f"gcl.u_{t}", index, dev)
            u = moving_average(u_old.repeat(k), visits.repeat(k), g, gamma)
            att = (
                attraction(sim, r.pos, r.fn_mask)
                if (r.fn_mask is not None and self.removal == "attract")
                else None
            )
            loss = loss + weight * global_contrastive_loss(g, u.clamp(min=1e-30), tau, att)
            extra = self.temperature_terms(u.clamp(min=1e-30), tau)
            if extra is not None:
                loss = loss + weight * extra
            new_rows[f"gcl.u_{t}"] = u.view(k, -1).mean(0)
            new_rows[f"gcl.visits_{t}"] = visits + 1
        penalty = self.temperature_penalty(tau)
        if penalty is not None:
            loss = loss + penalty
        return MethodOutput(loss, new_rows, {"tau": tau.detach().item(), "gamma": gamma})

    def temperature_penalty(self, tau: torch.Tensor) -> torch.Tensor | None:
        """Added once to the loss (``rho * tau`` for FastCLIP-v3; nothing here)."""
        return None


class FastCLIPv3(SogCLR):
    """The global loss with a learned temperature: ``tau = 1 / logit_scale`` starts at
    ``loss.tau`` (unless ``model.init_logit_scale`` is set), learns in its own parameter group
    at ``loss.tau_lr`` (scheduled by ``loss.tau_schedule``), and is kept above ``loss.tau_min``.
    The loss adds ``tau * mean log u`` per anchor type and ``rho * tau`` once."""

    name = "fastclip_v3"
    modes = ("clip",)

    def temperature_policy(self) -> TemperaturePolicy:
        c = self.cfg
        return TemperaturePolicy(
            math.log(1.0 / c.loss.tau) if c.model.init_logit_scale is None else None,
            group_lr=c.loss.tau_lr,
            lr_rule=c.loss.tau_schedule,
            max_logit_scale=math.log(1.0 / c.loss.tau_min),
        )

    def temperature(self, logit_scale: torch.Tensor) -> torch.Tensor:
        return 1.0 / logit_scale

    def temperature_terms(self, u: torch.Tensor, tau: torch.Tensor) -> torch.Tensor | None:
        return temperature_terms(u, tau)  # rho * tau is added once: temperature_penalty

    def temperature_penalty(self, tau: torch.Tensor) -> torch.Tensor | None:
        return temperature_penalty(tau, self.cfg.loss.rho)
