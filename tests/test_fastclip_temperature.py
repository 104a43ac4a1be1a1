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
import torch.nn.functional as F

from clipfnd.config import load_config
from clipfnd.state import StateTables
from clipfnd.train.objective import ClipObjective

B, D_IN, D, N = 10, 6, 4, 20
RHO = 6.5


def _setup(glofnd: bool, seed: int = 0):
    over = [
        "data.train=unused",
        "loss.name=fastclip_v3",
        f"loss.rho={RHO}",
        "loss.gamma_decay_epochs=0",
        "loss.gamma_min=0.3",
    ]
    if glofnd:  # mask from the first step on, from thresholds placed by hand below
        over += ["fnd.detector=glofnd", "fnd.start_mask=0", "fnd.alpha=0.1"]
        over += ["fnd.init=constant", "fnd.offset=false"]  # the thresholds as placed
    cfg = load_config(None, over)
    tables = StateTables(N)
    obj = ClipObjective(cfg, tables, has_labels=False)
    g = torch.Generator().manual_seed(seed)
    if glofnd:
        for t in ("img", "txt"):  # thresholds that flag a few negatives of most anchors
            tables[f"glofnd.lambda_{t}"].copy_(0.2 + 0.3 * torch.rand(N, generator=g))
    x_img = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    x_txt = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    w_img = torch.randn(D_IN, D, generator=g, dtype=torch.float64)
    w_txt = torch.randn(D_IN, D, generator=g, dtype=torch.float64)
    return cfg, tables, obj, (x_img, x_txt, w_img, w_txt)


def _features(data, idx, log_scale):
    x_img, x_txt, w_img, w_txt = data
    img = F.normalize(x_img[idx] @ w_img, dim=1)
    txt = F.normalize(x_txt[idx] @ w_txt, dim=1)
    return img, txt, log_scale.exp()


def _kept(sim: torch.Tensor, lam: torch.Tensor | None) -> list[list[int]]:
    """Kept negatives per row: not the positive, not above the anchor's threshold."""
    b = sim.shape[0]
    return [
        [j for j in range(b) if j != i and (lam is None or not bool(sim[i, j] > lam[i]))]
        for i in range(b)
    ]


def _lambdas(tables, idx, glofnd):
    if not glofnd:
        return {"img": None, "txt": None}
    return {t: tables[f"glofnd.lambda_{t}"][idx].to(torch.float64) for t in ("img", "txt")}


def closed_form_dF_dlogscale(img, txt, tau: float, lam) -> float:
    """d/d(log 1/tau) of 1/2 sum_t mean_i tau log g_i + rho tau, by the chain rule by hand:
    d(tau log g)/dtau = log g - (1/tau) sum_K e^{z/tau} z / sum_K e^{z/tau}, z = s_ij - s_ii."""
    total = 0.0
    for t, (a, o) in {"img": (img, txt), "txt": (txt, img)}.items():
        sim = (a @ o.T).detach()
        kept = _kept(sim, lam[t])
        per_anchor = []
        for i, ks in enumerate(kept):
            z = torch.tensor([float(sim[i, j] - sim[i, i]) for j in ks], dtype=torch.float64)
            e = torch.exp(z / tau)
            g = e.mean()
            per_anchor.append(math.log(g) - float((e * z).sum() / e.sum()) / tau)
        total += 0.5 * sum(per_anchor) / len(per_anchor)
    dF_dtau = total + RHO
    return dF_dtau * (-tau)  # tau = exp(-log_scale)


def naive_surrogate(img, txt, log_scale, u_old, visits, gamma, lam):
    """The step objective written loop by loop, with the detached prefactor."""
    tau = torch.exp(-log_scale)
    loss = RHO * tau
    for t, (a, o) in {"img": (img, txt), "txt": (txt, img)}.items():
        sim = a @ o.T
        kept = _kept(sim.detach(), lam[t])
        terms, logs = [], []
        for i, ks in enumerate(kept):
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
    cfg, tables, obj, data = _setup(glofnd)
    idx = torch.arange(B)
    log_scale = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
    img, txt, scale = _features(data, idx, log_scale)
    out = obj(img, txt, scale, idx, torch.full((B,), -1), epoch=0)
    out.loss.backward()
    lam = _lambdas(tables, idx, glofnd)
    if glofnd:  # the thresholds really remove negatives here
        assert any(len(k) < B - 1 for k in _kept((img @ txt.T).detach(), lam["img"]))
    want = closed_form_dF_dlogscale(img.detach(), txt.detach(), 0.07, lam)
    assert log_scale.grad.item() == pytest.approx(want, abs=1e-10, rel=1e-9)
    # the live-prefactor bug adds -tau * mean(g/u) = -tau exactly here (u = g): far outside
    assert abs(log_scale.grad.item() - (want - 0.07)) > 0.05


@pytest.mark.parametrize("glofnd", [False, True], ids=["fastclip_v3", "fastclip_v3_glofnd"])
def test_temperature_and_feature_gradients_match_the_naive_surrogate_on_a_later_step(glofnd):
    cfg, tables, obj, data = _setup(glofnd, seed=1)
    w_img = data[2].clone().requires_grad_()
    data = (data[0], data[1], w_img, data[3])
    log_scale = torch.tensor(math.log(1 / 0.05), dtype=torch.float64, requires_grad=True)
    # step 1 fills u for samples 0..9; step 2 revisits 5..9 (u != g there) and sees 10..14 fresh
    first = obj(
        *_features(data, torch.arange(B), log_scale), torch.arange(B), torch.full((B,), -1), epoch=0
    )
    obj.commit(first)
    idx = torch.arange(5, 5 + B)
    u_old = {t: tables[f"gcl.u_{t}"][idx].to(torch.float64) for t in ("img", "txt")}
    visits = {t: tables[f"gcl.visits_{t}"][idx] for t in ("img", "txt")}
    lam = _lambdas(tables, idx, glofnd)
    img, txt, scale = _features(data, idx, log_scale)
    got = obj(img, txt, scale, idx, torch.full((B,), -1), epoch=0).loss
    g_scale, g_w = torch.autograd.grad(got, [log_scale, w_img])
    img2, txt2, _ = _features(data, idx, log_scale)
    want = naive_surrogate(img2, txt2, log_scale, u_old, visits, cfg.loss.gamma_min, lam)
    w_scale, w_w = torch.autograd.grad(want, [log_scale, w_img])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-9)  # u is stored in float32
    torch.testing.assert_close(g_scale, w_scale, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(g_w, w_w, rtol=1e-6, atol=1e-9)
