"""Vision-only losses (``clipfnd.losses.unimodal``) against slow float64 loops of their
docs/methods.md formulas, forward and backward: NT-Xent (plain, eliminate, attract), DCL,
HCL and SSCL (synthesis off, and on with fixed draws), and the special cases."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipfnd.losses import info_nce_rows
from clipfnd.losses.unimodal import Mixing, debiased_rows, draw_mixing, view_columns


def ntxent_rows(anchors, others, pos, self_col, tau, fn_mask=None, removal="eliminate"):
    """Per-view NT-Xent losses as the ``simclr`` method computes them (``info_nce_rows`` at
    ``1/tau``), each view's own column no negative, as the vision-only objective marks it."""
    n = anchors.shape[0]
    own = torch.zeros(n, others.shape[0], dtype=torch.bool)
    own[torch.arange(n), self_col] = True
    return info_nce_rows(anchors, others, pos, 1.0 / tau, fn_mask, removal, True, own)


def views(B: int, d: int, seed: int) -> torch.Tensor:
    """``[2B, d]`` normalised views: view 2 of image i is a noisy copy of view 1."""
    g = torch.Generator().manual_seed(seed)
    z1 = F.normalize(torch.randn(B, d, generator=g, dtype=torch.float64), dim=1)
    z2 = F.normalize(z1 + 0.5 * torch.randn(B, d, generator=g, dtype=torch.float64), dim=1)
    return torch.cat([z1, z2])


def negatives(i: int, B: int) -> list[int]:
    """N_i: both views of every other image (not i itself, not its other view)."""
    return [j for j in range(2 * B) if j % B != i % B]


def naive_ntxent(z, B, tau, fn, removal):
    losses = []
    for i in range(2 * B):
        p = (i + B) % (2 * B)
        negs = negatives(i, B)
        e = {j: torch.exp(z[i] @ z[j] / tau) for j in range(2 * B)}
        flagged = [j for j in negs if fn is not None and bool(fn[i, j])]
        if removal == "attract":
            denom = e[p] + sum(e[j] for j in negs)
            losses.append(torch.stack([-torch.log(e[q] / denom) for q in [p, *flagged]]).mean())
            continue
        kept = [j for j in negs if j not in flagged]
        neg_sum = sum((e[j] for j in kept), torch.zeros((), dtype=z.dtype))
        if kept:
            neg_sum = neg_sum * len(negs) / len(kept)
        losses.append(-torch.log(e[p] / (e[p] + neg_sum)))
    return torch.stack(losses)


@pytest.mark.parametrize("B,d,tau", [(3, 4, 0.5), (6, 8, 0.1), (10, 5, 0.2)])
@pytest.mark.parametrize("mode", ["plain", "eliminate", "attract"])
def test_ntxent_matches_naive(B, d, tau, mode):
    z0 = views(B, d, B)
    fn = None
    if mode != "plain":  # flag a random third of each anchor's negatives
        g = torch.Generator().manual_seed(5)
        fn = torch.rand(2 * B, 2 * B, generator=g) < 0.33
        for i in range(2 * B):
            fn[i, i] = fn[i, (i + B) % (2 * B)] = False
    removal = "attract" if mode == "attract" else "eliminate"
    z = z0.clone().requires_grad_()
    pos, self_col = view_columns(B, B, 0)
    got = ntxent_rows(z, z, pos, self_col, tau, fn, removal)
    got.mean().backward()
    z2 = z0.clone().requires_grad_()
    want = naive_ntxent(z2, B, tau, fn, removal)
    want.mean().backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-8, atol=1e-12)


def naive_debiased(
    z, B, tau, tau_plus, beta, mixing: Mixing | None, not_negative=None, clamped=None
):
    """The formula loop by loop: pool = N_i (less ``not_negative``, + synthetic), weights,
    debiasing, clamp. ``clamped``, a list, receives per anchor whether the clamp binds."""
    losses = []
    for i in range(2 * B):
        p = (i + B) % (2 * B)
        negs = [j for j in negatives(i, B) if not_negative is None or not not_negative[i, j]]
        pool = [z[i] @ z[j] for j in negs]
        if mixing is not None:
            k = int(max(mixing.a.max(), mixing.b.max())) + 1
            hard = sorted(negs, key=lambda j: -float((z[i] @ z[j]).detach()))[:k]
            for a, b, m in zip(mixing.a[i].tolist(), mixing.b[i].tolist(), mixing.m[i].tolist()):
                syn = m * z[hard[a]] + (1 - m) * z[hard[b]]
                pool.append(z[i] @ (syn / syn.norm()))
        n = len(pool)
        e_pos = torch.exp(z[i] @ z[p] / tau)
        if n == 0:  # no negative: Ng = 0
            losses.append(-torch.log(e_pos / e_pos))
            continue
        imp = [torch.exp(beta * s / tau) for s in pool]
        mean_imp = sum(imp) / n
        weighted = sum(w / mean_imp * torch.exp(s / tau) for w, s in zip(imp, pool))
        ng = (weighted - tau_plus * n * e_pos) / (1 - tau_plus)
        floor = torch.tensor(n * math.exp(-1 / tau), dtype=z.dtype)
        if clamped is not None:
            clamped.append(bool(ng < floor))
        ng = torch.maximum(ng, floor)
        losses.append(-torch.log(e_pos / (e_pos + ng)))
    return torch.stack(losses)


@pytest.mark.parametrize("B,tau", [(4, 0.5), (8, 0.2)])
@pytest.mark.parametrize(
    "name,tau_plus,beta,synth",
    [
        ("dcl", 0.1, 0.0, False),
        ("hcl", 0.1, 1.0, False),
        ("sscl", 0.1, 1.0, True),
        ("sscl_no_debias", 0.0, 0.5, True),
    ],
)
def test_debiased_losses_match_naive(B, tau, name, tau_plus, beta, synth):
    z0 = views(B, 6, 40 + B)
    mixing = draw_mixing(2 * B, 4, 5, torch.Generator().manual_seed(9)) if synth else None
    z = z0.clone().requires_grad_()
    pos, self_col = view_columns(B, B, 0)
    got = debiased_rows(z, z, pos, self_col, tau, tau_plus, beta, mixing)
    got.mean().backward()
    z2 = z0.clone().requires_grad_()
    want = naive_debiased(z2, B, tau, tau_plus, beta, mixing)
    want.mean().backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-8, atol=1e-12)


def test_special_cases_reduce_as_stated():
    B, tau = 6, 0.3
    z = views(B, 5, 77)
    pos, self_col = view_columns(B, B, 0)
    nt = ntxent_rows(z, z, pos, self_col, tau)
    torch.testing.assert_close(
        debiased_rows(z, z, pos, self_col, tau, 0.0, 0.0), nt, rtol=1e-12, atol=1e-12
    )
    dcl = debiased_rows(z, z, pos, self_col, tau, 0.1, 0.0)
    hcl = debiased_rows(z, z, pos, self_col, tau, 0.1, 1.0)
    assert not torch.allclose(dcl, nt) and not torch.allclose(hcl, dcl)  # the knobs do something


def test_draw_mixing_pairs_are_distinct_and_reproducible():
    a = draw_mixing(7, 5, 11, torch.Generator().manual_seed(3))
    b = draw_mixing(7, 5, 11, torch.Generator().manual_seed(3))
    assert torch.equal(a.a, b.a) and torch.equal(a.m, b.m)
    assert bool((a.a != a.b).all()) and int(a.a.max()) < 5 and int(a.b.max()) < 5
    assert bool(((a.m >= 0) & (a.m < 1)).all())


def test_view_columns_of_a_rank():
    pos, self_col = view_columns(2, 6, 2)  # rank 1 of 3, 2 images each, 6 images in all
    assert self_col.tolist() == [2, 3, 8, 9] and pos.tolist() == [8, 9, 2, 3]


def test_empty_pool_is_finite():
    B = 3
    z = views(B, 4, 1).requires_grad_()
    pos, self_col = view_columns(B, B, 0)
    everything = torch.ones(2 * B, 2 * B, dtype=torch.bool)
    out = debiased_rows(z, z, pos, self_col, 0.5, 0.1, 1.0, not_negative=everything)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(z.grad).all()


def flagged(B: int, share: float, seed: int) -> torch.Tensor:
    """``[2B, 2B]``: a random ``share`` of each anchor's negatives flagged as false negatives."""
    fn = torch.rand(2 * B, 2 * B, generator=torch.Generator().manual_seed(seed)) < share
    for i in range(2 * B):
        fn[i, i] = fn[i, (i + B) % (2 * B)] = False
    return fn


def assert_close_to_float64(got: torch.Tensor, want: torch.Tensor) -> None:
    """float32 ``got`` against the float64 formula: the exponents reach ``(1 + beta) / t``
    (400 at ``t = 0.005``, ``beta = 1``), of which float32 keeps about 7 digits, so every
    weight ``e^z`` carries a relative error up to about ``400 * 6e-8 = 2.4e-5`` (measured: at
    most 2.3e-5 over these cases). The bound, 1e-4 of the value's scale, leaves room for that
    and still fails on any real difference (or on an overflow, which is inf or NaN)."""
    want = want.detach()
    scale = max(1.0, float(want.abs().max()))
    torch.testing.assert_close(got.double(), want, rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize("tau", [0.07, 0.01, 0.005])
@pytest.mark.parametrize(
    "name,tau_plus,beta,synth,fn_share",
    [
        ("dcl", 0.1, 0.0, False, 0.0),
        ("hcl", 0.1, 1.0, False, 0.0),
        ("hcl_flagged", 0.1, 1.0, False, 0.3),
        ("sscl", 0.1, 1.0, True, 0.0),
        ("sscl_flagged", 0.05, 0.5, True, 0.2),
        ("hcl_no_debias", 0.0, 1.0, False, 0.0),
    ],
)
def test_debiased_losses_are_stable_at_small_temperatures(
    tau, name, tau_plus, beta, synth, fn_share
):
    B = 8
    z0 = views(B, 6, 60).float()
    fn = flagged(B, fn_share, 61) if fn_share else None
    mixing = draw_mixing(2 * B, 4, 5, torch.Generator().manual_seed(9)) if synth else None
    pos, self_col = view_columns(B, B, 0)
    z = z0.clone().requires_grad_()
    got = debiased_rows(z, z, pos, self_col, tau, tau_plus, beta, mixing, not_negative=fn)
    got.mean().backward()
    z2 = z0.double().requires_grad_()
    want = naive_debiased(z2, B, tau, tau_plus, beta, mixing, not_negative=fn)
    want.mean().backward()
    assert torch.isfinite(got).all() and torch.isfinite(z.grad).all()
    assert_close_to_float64(got, want)
    assert_close_to_float64(z.grad, z2.grad)


@pytest.mark.parametrize("tau", [0.2, 0.01])
def test_debiasing_clamp_binds_for_some_anchors_and_matches(tau):
    """A strong prior (tau_plus 0.6) makes the debiased sum negative for the anchors whose
    positive is close: the clamp |M| e^{-1/t} binds there and not elsewhere, in both dtypes."""
    B = 8
    z0 = views(B, 6, 70)
    pos, self_col = view_columns(B, B, 0)
    clamped: list[bool] = []
    z2 = z0.clone().requires_grad_()
    want = naive_debiased(z2, B, tau, 0.6, 1.0, None, clamped=clamped)
    want.mean().backward()
    assert any(clamped) and not all(clamped)
    z = z0.clone().requires_grad_()
    got = debiased_rows(z, z, pos, self_col, tau, 0.6, 1.0)
    got.mean().backward()
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(z.grad, z2.grad, rtol=1e-8, atol=1e-10)
    z32 = z0.float().requires_grad_()
    got32 = debiased_rows(z32, z32, pos, self_col, tau, 0.6, 1.0)
    got32.mean().backward()
    assert_close_to_float64(got32, want)
    assert_close_to_float64(z32.grad, z2.grad)


@pytest.mark.parametrize("tau", [0.5, 0.01, 0.005])
def test_empty_pools_give_zero_and_finite_gradients(tau):
    """Anchors whose every negative is flagged lose 0 and pass no NaN back, beside anchors
    that keep theirs."""
    B = 4
    z0 = views(B, 5, 80).float()
    pos, self_col = view_columns(B, B, 0)
    fn = torch.zeros(2 * B, 2 * B, dtype=torch.bool)
    fn[:2] = True  # anchors 0 and 1: nothing left
    z = z0.clone().requires_grad_()
    got = debiased_rows(z, z, pos, self_col, tau, 0.1, 1.0, not_negative=fn)
    got.sum().backward()
    assert torch.isfinite(got).all() and torch.isfinite(z.grad).all()
    assert got[:2].tolist() == [0.0, 0.0]
    z2 = z0.double().requires_grad_()
    want = naive_debiased(z2, B, tau, 0.1, 1.0, None, not_negative=fn)
    want.sum().backward()
    assert_close_to_float64(got, want)
    assert_close_to_float64(z.grad, z2.grad)


@pytest.mark.parametrize("tau", [0.01, 0.005])
@pytest.mark.parametrize("mode", ["plain", "eliminate", "attract"])
def test_ntxent_is_stable_at_small_temperatures(tau, mode):
    """NT-Xent is a cross-entropy of the logits (log-sum-exp inside): float32 at t = 0.005
    matches the float64 formula."""
    B = 8
    z0 = views(B, 6, 90).float()
    fn = flagged(B, 0.3, 91) if mode != "plain" else None
    removal = "attract" if mode == "attract" else "eliminate"
    pos, self_col = view_columns(B, B, 0)
    z = z0.clone().requires_grad_()
    got = ntxent_rows(z, z, pos, self_col, tau, fn, removal)
    got.mean().backward()
    z2 = z0.double().requires_grad_()
    want = naive_ntxent(z2, B, tau, fn, removal)
    want.mean().backward()
    assert_close_to_float64(got, want)
    assert_close_to_float64(z.grad, z2.grad)
