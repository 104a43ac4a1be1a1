"""FastCLIP-v3's learned temperature: the gradient of the whole step objective in
``logit_scale`` (docs/methods.md, "Global contrastive loss": the prefactor ``tau`` of
``g / u`` is detached).

Two references, both float64 and written from the formulas, not from the implementation:
- at ``u = g`` (a sample's first visit), the closed-form derivative of the objective
  ``F(tau) = 1/2 sum_t mean_i tau log g_i(tau) + rho tau``;
- on a later step (``u`` from the table, not equal to ``g``), autograd of a loop-by-loop
  surrogate ``1/2 sum_t [ sg(tau) mean_i g_i / u_i + tau mean_i log u_i ] + rho tau``.
"""

from __future__ import annotations

import math

import pytest
import torch

from clipfnd.testing.fastclip import (
    RHO,
    B,
    closed_form_dF_dlogscale,
    features,
    kept,
    lambdas,
    setup,
)


def naive_surrogate(img, txt, log_scale, u_old, visits, gamma, lam):
    """The step objective written loop by loop, with the detached prefactor."""
    tau = torch.exp(-log_scale)
    loss = RHO * tau
    for t, (a, o) in {"img": (img, txt), "txt": (txt, img)}.items():
        sim = a @ o.T
        kept_cols = kept(sim.detach(), lam[t])
        terms, logs = [], []
        for i, ks in enumerate(kept_cols):
            g = sum(torch.exp((sim[i, j] - sim[i, i]) / tau) for j in ks) / len(ks)
            gam = gamma if visits[t][i] > 0 else 1.0
            u = (1 - gam) * u_old[t][i] + gam * g.detach()
            terms.append(g / u)
            logs.append(torch.log(u))
        loss = loss + 0.5 * (
            tau.detach() * torch.stack(terms).mean() + tau * torch.stack(logs).mean()
        )
    return loss


@pytest.mark.parametrize("glofnd", [False, True], ids=["fastclip_v3", "fastclip_v3_glofnd"])
def test_temperature_gradient_at_u_equal_g_is_the_objectives(glofnd):
    cfg, tables, obj, data = setup(glofnd)
    idx = torch.arange(B)
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    img, txt, scale = features(data, idx, log_scale)
    out = obj(img, txt, scale, idx, torch.full((B,), -1), epoch=0)
    out.loss.backward()
    lam = lambdas(tables, idx, glofnd)
    if glofnd:  # the thresholds really remove negatives here
        assert any(len(k) < B - 1 for k in kept((img @ txt.T).detach(), lam["img"]))
    want = closed_form_dF_dlogscale(img.detach(), txt.detach(), 0.07, lam)
    assert log_scale.grad.item() == pytest.approx(want, abs=1e-10, rel=1e-9)
    # the live-prefactor bug adds -tau * mean(g/u) = -tau exactly here (u = g): far outside
    assert abs(log_scale.grad.item() - (want - 0.07)) > 0.05


@pytest.mark.parametrize("glofnd", [False, True], ids=["fastclip_v3", "fastclip_v3_glofnd"])
def test_temperature_and_feature_gradients_match_the_naive_surrogate_on_a_later_step(glofnd):
    cfg, tables, obj, data = setup(glofnd, seed=1)
    w_img = data[2].clone().requires_grad_()
    data = (data[0], data[1], w_img, data[3])
    log_scale = torch.tensor(math.log(1 / 0.05), dtype=torch.float64, requires_grad=True)
    # step 1 fills u for samples 0..9; step 2 revisits 5..9 (u != g there) and sees 10..14 fresh
    first = obj(
        *features(data, torch.arange(B), log_scale), torch.arange(B), torch.full((B,), -1), epoch=0
    )
    obj.commit(first)
    idx = torch.arange(5, 5 + B)
    u_old = {t: tables[f"gcl.u_{t}"][idx].to(torch.float64) for t in ("img", "txt")}
    visits = {t: tables[f"gcl.visits_{t}"][idx] for t in ("img", "txt")}
    lam = lambdas(tables, idx, glofnd)
    img, txt, scale = features(data, idx, log_scale)
    got = obj(img, txt, scale, idx, torch.full((B,), -1), epoch=0).loss
    g_scale, g_w = torch.autograd.grad(got, [log_scale, w_img])
    img2, txt2, _ = features(data, idx, log_scale)
    want = naive_surrogate(img2, txt2, log_scale, u_old, visits, cfg.loss.gamma_min, lam)
    w_scale, w_w = torch.autograd.grad(want, [log_scale, w_img])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)  # u is stored in float32
    torch.testing.assert_close(g_scale, w_scale, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_w, w_w, rtol=1e-6, atol=1e-9)
