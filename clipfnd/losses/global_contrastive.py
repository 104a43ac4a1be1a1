"""Global contrastive loss: SogCLR and FastCLIP (v1: constant temperature, v3: learned).

Yuan et al., "Provable Stochastic Optimization for Global Contrastive Learning: Small Batch
Does Not Harm Performance" (ICML 2022, SogCLR); Wei et al., "FastCLIP: A Suite of
Optimization Techniques to Accelerate CLIP Training with Limited Resources" (2024).
docs/methods.md, "Global contrastive loss".

For a local anchor ``i`` with dataset index ``n``, positive ``p``, kept negatives ``K_i``::

    g_i = mean_{j in K_i} exp( (s_ij - s_ip) / tau )        (0 when K_i is empty)
    u_n <- (1 - gamma) u_n + gamma g_i.detach()              (``moving_average``)
    L   = sg(tau) * mean_i [ g_i / u_n ]                     (u_n a constant)

``sg`` is stop-gradient: the prefactor ``tau`` is detached, as FastCLIP's code does. With a
constant ``tau`` this changes nothing; with a learned one it is what makes the surrogate's
gradient in ``tau`` that of the objective ``tau * mean_i log g_i`` (at ``u = g``): a live
prefactor would add ``mean_i g_i / u_n`` (about 1) to it, as if ``rho`` were one larger.

With ``attract``, the flagged false negatives ``F_i`` join the positive: the objective
``tau * mean_{q in {p} U F_i} log mean_{j in N_i} exp((s_ij - s_iq)/tau)`` equals
``tau * log g_i - (mean_q s_iq - s_ip)`` with ``g_i`` over all of ``N_i``, so its surrogate
is ``tau * g_i / u_n - (mean_q s_iq - s_ip)``.

FastCLIP-v3 adds ``rho * tau + tau * mean_i log u_n`` (``tau`` live there), and ``tau`` is
learned: the step objective's gradient in ``tau`` is then
``mean_i log u_n + tau * mean_i (dg_i/dtau) / u_n + rho``.

The functions here are pure: the ``u`` table is read by the method and written by the
training step (``clipfnd.methods.global_contrastive``).
"""

from __future__ import annotations

import math

import torch


def negative_ratio(
    sim: torch.Tensor,
    pos: torch.Tensor,
    tau: torch.Tensor | float,
    kept: torch.Tensor,
) -> torch.Tensor:
    """``g_i``: mean over kept negatives of ``exp((s_ij - s_ip)/tau)``.

    Shape: sim ``[b, M]`` cosine similarities; pos ``[b]``; kept ``[b, M]`` bool (False at the
    positive and at removed negatives). Returns ``[b]``; 0 for a row with nothing kept.
    """
    rows = torch.arange(sim.shape[0], device=sim.device)
    s_pos = sim[rows, pos]
    z = (sim - s_pos[:, None]) / tau
    # exp of masked entries is replaced by 0 without ever computing exp(+large) into a NaN grad
    e = torch.where(kept, torch.exp(z.masked_fill(~kept, 0.0)), torch.zeros_like(z))
    n_kept = kept.sum(1)
    return e.sum(1) / n_kept.clamp(min=1).to(sim.dtype)


def kept_negatives(
    pos: torch.Tensor,
    shape: tuple[int, int],
    fn_mask: torch.Tensor | None,
    removal: str,
    device,
    not_negative: torch.Tensor | None = None,
) -> torch.Tensor:
    """Negatives that stay in ``g``: everything but the positive and the ``not_negative``
    columns (other copies of the anchor's own sample), minus ``F_i`` under eliminate."""
    b, m = shape
    kept = torch.ones(b, m, dtype=torch.bool, device=device)
    kept[torch.arange(b, device=device), pos] = False
    if not_negative is not None:
        kept &= ~not_negative
    if fn_mask is not None and removal == "eliminate":
        kept &= ~fn_mask
    return kept


def attraction(sim: torch.Tensor, pos: torch.Tensor, fn_mask: torch.Tensor) -> torch.Tensor:
    """``mean_{q in {p} U F_i} s_iq - s_ip`` per row (0 where nothing is flagged). ``[b]``."""
    b = sim.shape[0]
    rows = torch.arange(b, device=sim.device)
    targets = fn_mask.clone()
    targets[rows, pos] = True
    t = targets.to(sim.dtype)
    return (sim * t).sum(1) / t.sum(1) - sim[rows, pos]


def global_contrastive_loss(
    g: torch.Tensor,
    u: torch.Tensor,
    tau: torch.Tensor | float,
    attract: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sg(tau) * mean(g / u)`` (minus the attraction term when given). ``u`` must be detached.

    The prefactor carries no gradient to ``tau`` (see the module docstring); ``tau`` still
    reaches ``g`` through the exponent, where it belongs.
    """
    prefactor = tau.detach() if torch.is_tensor(tau) else tau
    loss = prefactor * (g / u).mean()
    if attract is not None:
        loss = loss - attract.mean()
    return loss


def temperature_penalty(tau: torch.Tensor, rho: float) -> torch.Tensor:
    """FastCLIP-v3's ``rho * tau``, added once to a step's loss (not once per anchor type)."""
    return rho * tau


def temperature_terms(u: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
    """FastCLIP-v3's extra term for one anchor type: ``tau * mean log u`` (its ``rho * tau`` is
    ``temperature_penalty``, added once a step)."""
    return tau * torch.log(u).mean()


def moving_average(
    u: torch.Tensor, visits: torch.Tensor, g: torch.Tensor, gamma: float
) -> torch.Tensor:
    """``u_n <- (1 - gamma) u_n + gamma g_i.detach()``, with ``gamma = 1`` on a sample's first
    visit (``visits == 0``). ``[b]`` each; returns the new ``u`` (not yet written)."""
    gam = torch.where(visits > 0, torch.full_like(u, gamma), torch.ones_like(u))
    return (1 - gam) * u + gam * g.detach()


def gamma_schedule(epoch: int, gamma_min: float, decay_epochs: int) -> float:
    """Cosine decay of the moving-average weight from 1.0 to ``gamma_min``, then constant."""
    if decay_epochs <= 0 or epoch >= decay_epochs:
        return gamma_min
    return gamma_min + (1.0 - gamma_min) * 0.5 * (1.0 + math.cos(math.pi * epoch / decay_epochs))
