"""Every loss against a slow, direct computation of its docs/methods.md formula (forward and backward)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from clip_path import clip_loss

from clipfnd.losses import (
    attraction,
    gamma_schedule,
    global_contrastive_loss,
    kept_negatives,
    negative_ratio,
    temperature_penalty,
    temperature_terms,
)


def feats(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def random_mask(b: int, m: int, p: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.rand(b, m, generator=g) < p


# --- naive loops ---------------------------------------------------------------------------
def naive_rows(sim, tau, fn, removal, rescale):
    """Per-anchor loss, one anchor and one negative at a time (positive on the diagonal)."""
    b, m = sim.shape
    out = []
    for i in range(b):
        negs = [j for j in range(m) if j != i]
        flagged = [j for j in negs if fn is not None and bool(fn[i, j])]
        kept = [j for j in negs if j not in flagged]
        e_pos = torch.exp(sim[i, i] / tau)
        if removal == "attract":
            denom = sum(torch.exp(sim[i, j] / tau) for j in range(m))
            terms = [torch.log(torch.exp(sim[i, q] / tau) / denom) for q in [i] + flagged]
            out.append(-sum(terms) / len(terms))
        else:
            neg_sum = sum(
                (torch.exp(sim[i, j] / tau) for j in kept), torch.zeros((), dtype=sim.dtype)
            )
            if rescale and kept:
                neg_sum = neg_sum * len(negs) / len(kept)
            out.append(-torch.log(e_pos / (e_pos + neg_sum)))
    return torch.stack(out)


def naive_clip(img, txt, tau, fn_i, fn_t, removal="eliminate", rescale=True):
    s = img @ txt.T
    return (
        0.5 * naive_rows(s, tau, fn_i, removal, rescale).mean()
        + 0.5 * naive_rows(s.T, tau, fn_t, removal, rescale).mean()
    )


@pytest.mark.parametrize("b,d,tau", [(4, 3, 0.07), (9, 16, 0.5), (16, 8, 0.01)])
@pytest.mark.parametrize("mode", ["plain", "eliminate", "eliminate_norescale", "attract"])
def test_clip_loss_matches_naive(b, d, tau, mode):
    img0, txt0 = feats(b, d, 1), feats(b, d, 2)
    fn_i = fn_t = None
    removal, rescale = "eliminate", True
    if mode != "plain":
        fn_i, fn_t = random_mask(b, b, 0.3, 3), random_mask(b, b, 0.3, 4)
        eye = torch.eye(b, dtype=torch.bool)
        fn_i, fn_t = fn_i & ~eye, fn_t & ~eye
        removal = "attract" if mode == "attract" else "eliminate"
        rescale = mode != "eliminate_norescale"
    img, txt = img0.clone().requires_grad_(), txt0.clone().requires_grad_()
    got = clip_loss(
        img,
        txt,
        img,
        txt,
        torch.tensor(1 / tau, dtype=torch.float64),
        0,
        fn_i,
        fn_t,
        removal,
        rescale,
    )
    got.backward()
    img2, txt2 = img0.clone().requires_grad_(), txt0.clone().requires_grad_()
    want = naive_clip(img2, txt2, tau, fn_i, fn_t, removal, rescale)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(img.grad, img2.grad, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(txt.grad, txt2.grad, rtol=1e-8, atol=1e-10)


def test_clip_loss_equals_cross_entropy_without_masks():
    img, txt = feats(8, 5, 1), feats(8, 5, 2)
    scale = torch.tensor(10.0, dtype=torch.float64)
    logits = scale * img @ txt.T
    labels = torch.arange(8)
    want = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))
    torch.testing.assert_close(clip_loss(img, txt, img, txt, scale), want)
    empty = torch.zeros(8, 8, dtype=torch.bool)
    for removal in ("eliminate", "attract"):
        for rescale in (True, False):
            torch.testing.assert_close(
                clip_loss(img, txt, img, txt, scale, 0, empty, empty, removal, rescale), want
            )


def test_clip_loss_everything_flagged_is_finite():
    b = 5
    img, txt = feats(b, 4, 1).requires_grad_(), feats(b, 4, 2)
    allf = ~torch.eye(b, dtype=torch.bool)
    loss = clip_loss(img, txt, img, txt, torch.tensor(14.0, dtype=torch.float64), 0, allf, allf)
    loss.backward()
    assert loss.item() == 0.0  # no negatives left: -log(e/e)
    assert torch.isfinite(img.grad).all()


def test_clip_loss_offset_selects_local_rows():
    """A rank's rows against the gathered batch equal the matching rows of the full loss."""
    B, b, d = 8, 4, 6
    img, txt = feats(B, d, 5), feats(B, d, 6)
    scale = torch.tensor(1 / 0.1, dtype=torch.float64)
    full = clip_loss(img, txt, img, txt, scale)
    halves = [
        clip_loss(img[r * b : (r + 1) * b], txt[r * b : (r + 1) * b], img, txt, scale, r * b)
        for r in range(2)
    ]
    torch.testing.assert_close(sum(halves) / 2, full)


# --- global contrastive -----------------------------------------------------------------------
def naive_global(sim, u, tau, fn, removal):
    b, m = sim.shape
    terms = []
    for i in range(b):
        negs = [j for j in range(m) if j != i]
        flagged = [j for j in negs if fn is not None and bool(fn[i, j])]
        kept = negs if removal == "attract" else [j for j in negs if j not in flagged]
        g = sum(
            (torch.exp((sim[i, j] - sim[i, i]) / tau) for j in kept),
            torch.zeros((), dtype=sim.dtype),
        )
        g = g / len(kept) if kept else g
        term = tau * g / u[i]
        if removal == "attract":
            qs = [i] + flagged
            term = term - (sum(sim[i, q] for q in qs) / len(qs) - sim[i, i])
        terms.append(term)
    return torch.stack(terms).mean()


@pytest.mark.parametrize("b,d,tau", [(5, 4, 0.1), (12, 8, 0.05)])
@pytest.mark.parametrize("mode", ["plain", "eliminate", "attract"])
def test_global_loss_matches_naive(b, d, tau, mode):
    x0, y0 = feats(b, d, 11), feats(b, d, 12)
    u = torch.rand(b, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) + 0.5
    fn = None if mode == "plain" else random_mask(b, b, 0.3, 7) & ~torch.eye(b, dtype=torch.bool)
    removal = "attract" if mode == "attract" else "eliminate"
    pos = torch.arange(b)
    x = x0.clone().requires_grad_()
    sim = x @ y0.T
    kept = kept_negatives(pos, (b, b), fn, removal, "cpu")
    g = negative_ratio(sim, pos, tau, kept)
    att = attraction(sim, pos, fn) if mode == "attract" else None
    got = global_contrastive_loss(g, u, tau, att)
    got.backward()
    x2 = x0.clone().requires_grad_()
    want = naive_global(x2 @ y0.T, u, tau, fn, removal)
    want.backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-8, atol=1e-12)


def test_global_loss_gradient_is_gradient_of_log_mean_exp():
    """With u equal to the current g, the surrogate's gradient is that of tau*log(g)."""
    b, d, tau = 6, 5, 0.1
    x0, y = feats(b, d, 21), feats(b, d, 22)
    pos = torch.arange(b)
    kept = kept_negatives(pos, (b, b), None, "eliminate", "cpu")
    x = x0.clone().requires_grad_()
    g = negative_ratio(x @ y.T, pos, tau, kept)
    global_contrastive_loss(g, g.detach(), tau).backward()
    x2 = x0.clone().requires_grad_()
    (tau * torch.log(negative_ratio(x2 @ y.T, pos, tau, kept)).mean()).backward()
    torch.testing.assert_close(x.grad, x2.grad)


def test_global_loss_empty_kept_set_is_zero_and_finite():
    b = 4
    x = feats(b, 3, 1).requires_grad_()
    pos = torch.arange(b)
    allf = ~torch.eye(b, dtype=torch.bool)
    kept = kept_negatives(pos, (b, b), allf, "eliminate", "cpu")
    g = negative_ratio(x @ x.T.detach(), pos, 0.05, kept)
    assert torch.equal(g, torch.zeros(b, dtype=torch.float64))
    global_contrastive_loss(g, torch.ones(b, dtype=torch.float64), 0.05).backward()
    assert torch.isfinite(x.grad).all()


def test_fastclip_v3_temperature_terms_and_gradient():
    u = torch.tensor([0.5, 2.0, 1.5], dtype=torch.float64)
    tau = torch.tensor(0.07, dtype=torch.float64, requires_grad=True)
    t = temperature_terms(u, tau) + temperature_penalty(tau, 6.5)  # per anchor type + once
    want = 6.5 * 0.07 + 0.07 * (math.log(0.5) + math.log(2.0) + math.log(1.5)) / 3
    assert abs(t.item() - want) < 1e-12
    t.backward()
    assert abs(tau.grad.item() - (6.5 + torch.log(u).mean().item())) < 1e-12


def test_gamma_schedule_cosine():
    assert gamma_schedule(0, 0.2, 10) == pytest.approx(1.0)
    assert gamma_schedule(5, 0.2, 10) == pytest.approx(0.6)
    assert gamma_schedule(10, 0.2, 10) == pytest.approx(0.2)
    assert gamma_schedule(30, 0.2, 10) == pytest.approx(0.2)
    vals = [gamma_schedule(e, 0.2, 10) for e in range(11)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))


@pytest.mark.parametrize("tau", [0.01, 0.005])
@pytest.mark.parametrize("mode", ["plain", "eliminate", "attract"])
def test_clip_loss_float32_is_stable_at_small_temperatures(tau, mode):
    """float32 at logit scale 200 against the float64 formula. The bound: float32 keeps about
    7 digits of logits up to 1/t = 200, so each e^{l} carries a relative error near
    200 * 6e-8 = 1.2e-5; 1e-4 of the value's scale allows that and nothing more."""
    b, d = 16, 8
    img0, txt0 = feats(b, d, 11).float(), feats(b, d, 12).float()
    fn_i = fn_t = None
    if mode != "plain":
        eye = torch.eye(b, dtype=torch.bool)
        fn_i, fn_t = random_mask(b, b, 0.3, 13) & ~eye, random_mask(b, b, 0.3, 14) & ~eye
    removal = "attract" if mode == "attract" else "eliminate"
    img, txt = img0.clone().requires_grad_(), txt0.clone().requires_grad_()
    got = clip_loss(img, txt, img, txt, torch.tensor(1 / tau), 0, fn_i, fn_t, removal)
    got.backward()
    img2, txt2 = img0.double().requires_grad_(), txt0.double().requires_grad_()
    want = naive_clip(img2, txt2, tau, fn_i, fn_t, removal)
    want.backward()
    for a, w in [(got, want), (img.grad, img2.grad), (txt.grad, txt2.grad)]:
        w = w.detach()
        scale = max(1.0, float(w.abs().max()))
        torch.testing.assert_close(a.double(), w, rtol=1e-4, atol=1e-4 * scale)
