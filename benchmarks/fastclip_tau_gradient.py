"""FastCLIP-v3's temperature gradient at u = g (a numerical check, not a timing).

Prints d loss / d log(1/tau) of the step objective as it is, the closed-form derivative of the
objective tau * mean log g + rho * tau, and the step objective with the live tau prefactor the
code had before (which learns as if rho were one larger). Run from the repository root:

    .venv/bin/python benchmarks/fastclip_tau_gradient.py
"""

import math

import torch

import clipfnd.methods.global_contrastive as mgc
from clipfnd.testing.fastclip import B, closed_form_dF_dlogscale, features, lambdas, setup


def old_loss(g, u, tau, attract=None):  # the code before the fix: a live prefactor
    loss = tau * (g / u).mean()
    return loss - attract.mean() if attract is not None else loss


def grad(glofnd, patched):
    saved = mgc.global_contrastive_loss
    if patched:
        mgc.global_contrastive_loss = old_loss
    try:
        cfg, tables, obj, data = setup(glofnd)
        idx = torch.arange(B)
        ls = torch.tensor(math.log(1 / 0.07), dtype=torch.float64, requires_grad=True)
        img, txt, scale = features(data, idx, ls)
        obj(img, txt, scale, idx, torch.full((B,), -1), epoch=0).loss.backward()
        want = closed_form_dF_dlogscale(
            img.detach(), txt.detach(), 0.07, lambdas(tables, idx, glofnd)
        )
        return ls.grad.item(), want
    finally:
        mgc.global_contrastive_loss = saved


for glofnd in (False, True):
    now, want = grad(glofnd, False)
    old, _ = grad(glofnd, True)
    print(
        f"fastclip_v3{'+glofnd' if glofnd else ''}: d loss/d log(1/tau) at u = g: now {now:.4f}, "
        f"derivative of the objective {want:.4f}, before the fix {old:.4f}"
    )
