"""FastCLIP-v3's learned temperature written from the formulas, not from the implementation
(float64): a tiny two-tower problem, and the closed-form derivative of the step objective in
``logit_scale`` at a sample's first visit (``u = g``). Used by
``tests/test_fastclip_temperature.py`` and ``benchmarks/fastclip_tau_gradient.py``."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..config import load_config
from ..state import StateTables
from ..train.objective import ClipObjective

B, D_IN, D, N = 10, 6, 4, 20
RHO = 6.5


def setup(glofnd: bool, seed: int = 0):
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


def features(data, idx, log_scale):
    x_img, x_txt, w_img, w_txt = data
    img = F.normalize(x_img[idx] @ w_img, dim=1)
    txt = F.normalize(x_txt[idx] @ w_txt, dim=1)
    return img, txt, log_scale.exp()


def kept(sim: torch.Tensor, lam: torch.Tensor | None) -> list[list[int]]:
    """Kept negatives per row: not the positive, not above the anchor's threshold."""
    b = sim.shape[0]
    return [
        [j for j in range(b) if j != i and (lam is None or not bool(sim[i, j] > lam[i]))]
        for i in range(b)
    ]


def lambdas(tables, idx, glofnd):
    if not glofnd:
        return {"img": None, "txt": None}
    return {t: tables[f"glofnd.lambda_{t}"][idx].to(torch.float64) for t in ("img", "txt")}


def closed_form_dF_dlogscale(img, txt, tau: float, lam) -> float:
    """d/d(log 1/tau) of 1/2 sum_t mean_i tau log g_i + rho tau, by the chain rule by hand:
    d(tau log g)/dtau = log g - (1/tau) sum_K e^{z/tau} z / sum_K e^{z/tau}, z = s_ij - s_ii."""
    total = 0.0
    for t, (a, o) in {"img": (img, txt), "txt": (txt, img)}.items():
        sim = (a @ o.T).detach()
        kept_cols = kept(sim, lam[t])
        per_anchor = []
        for i, ks in enumerate(kept_cols):
            z = torch.tensor([float(sim[i, j] - sim[i, i]) for j in ks], dtype=torch.float64)
            e = torch.exp(z / tau)
            g = e.mean()
            per_anchor.append(math.log(g) - float((e * z).sum() / e.sum()) / tau)
        total += 0.5 * sum(per_anchor) / len(per_anchor)
    dF_dtau = total + RHO
    return dF_dtau * (-tau)  # tau = exp(-log_scale)
