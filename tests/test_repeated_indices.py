"""A dataset index twice in one global batch (``data.resampled=true`` draws shards per rank
and worker): the other copy is neither the anchor's positive nor a negative, is never
flagged, and is counted; each table row is written once, by the first occurrence.

The 2-process half of this is in ``test_distributed.py`` (``*_repeats`` configs)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipfnd.config import load_config
from clipfnd.state import StateTables
from clipfnd.state.tables import first_occurrences
from clipfnd.train.objective import ClipObjective

IDX = torch.tensor([0, 1, 2, 0, 3, 1, 4])  # samples 0 and 1 twice: 2 duplicates
N, D, TAU, ALPHA, LR, LAM = 8, 5, 0.1, 0.1, 0.05, 0.2


def _features():
    g = torch.Generator().manual_seed(4)
    base_img = F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1)
    base_txt = F.normalize(
        base_img + 0.3 * torch.randn(N, D, generator=g, dtype=torch.float64), dim=1
    )
    return base_img[IDX], base_txt[IDX]  # a copy has exactly its original's features


def _objective(*extra, lam: float = LAM):
    cfg = load_config(
        None,
        [
            "data.train=unused",
            "fnd.detector=glofnd",
            "fnd.init=constant",  # thresholds placed by hand below, used as they are
            "fnd.offset=false",
            "fnd.start_mask=0",
            f"fnd.alpha={ALPHA}",
            f"fnd.lr={LR}",
            *extra,
        ],
    )
    tables = StateTables(N)
    obj = ClipObjective(cfg, tables, has_labels=False)
    for t in ("img", "txt"):
        tables[f"glofnd.lambda_{t}"].fill_(lam)
    return cfg, obj


def _step(obj, img, txt, log_scale=None):
    """The objective on the batch ``IDX`` (no labels), at the test's temperature (or at
    ``exp(log_scale)``, a learned one)."""
    scale = torch.tensor(1 / TAU, dtype=torch.float64) if log_scale is None else log_scale.exp()
    return obj(img, txt, scale, IDX, torch.full((len(IDX),), -1), epoch=0)


def _leaves():
    """Fresh leaf copies of the features and of ``log(1/TAU)``, for gradients."""
    img, txt = _features()
    log_scale = torch.tensor(math.log(1 / TAU), dtype=torch.float64)
    return [x.clone().requires_grad_() for x in (img, txt, log_scale)]


def naive_rows(sim, removal, scale=1 / TAU):
    """Per-anchor loss, flags and |N_i| with copies left out of N_i (loops over the formula)."""
    b = sim.shape[0]
    losses, n_flag, n_neg = [], [], []
    for i in range(b):
        negs = [j for j in range(b) if j != i and int(IDX[j]) != int(IDX[i])]
        flagged = [j for j in negs if float(sim[i, j].detach()) > LAM]
        kept = [j for j in negs if j not in flagged]
        e = {j: torch.exp(scale * sim[i, j]) for j in range(b)}
        if removal == "eliminate":
            neg_sum = sum((e[j] for j in kept), torch.zeros((), dtype=sim.dtype))
            if kept:
                neg_sum = neg_sum * len(negs) / len(kept)
            losses.append(-torch.log(e[i] / (e[i] + neg_sum)))
        else:  # attract: mean over {p} U F of -log softmax over {p} U N_i
            denom = e[i] + sum(e[j] for j in negs)
            losses.append(torch.stack([-torch.log(e[q] / denom) for q in [i, *flagged]]).mean())
        n_flag.append(len(flagged))
        n_neg.append(len(negs))
    return torch.stack(losses), n_flag, n_neg


@pytest.mark.parametrize("removal", ["eliminate", "attract"])
def test_copies_are_not_negatives_in_the_clip_loss_and_glofnd(removal):
    cfg, obj = _objective(f"fnd.removal={removal}")
    img, txt, log_scale = _leaves()
    out = _step(obj, img, txt, log_scale)
    assert out.duplicates == 2
    out.loss.backward()
    img2, txt2, log_scale2 = _leaves()
    want = 0.0
    for t, (a, o) in {"img": (img2, txt2), "txt": (txt2, img2)}.items():
        sim = a @ o.T
        per_anchor, n_flag, n_neg = naive_rows(sim, removal, log_scale2.exp())
        want = want + 0.5 * per_anchor.mean()
        # GloFND's first Adam step: mhat = g, vhat = g^2, so lambda moves by lr * sign(g)
        g = torch.tensor([ALPHA - f / n for f, n in zip(n_flag, n_neg)], dtype=torch.float64)
        lam = (LAM - LR * g / (g.abs() + 1e-8)).clamp(-1, 1)
        torch.testing.assert_close(out.rows[f"glofnd.lambda_{t}"].double(), lam, atol=1e-6, rtol=0)
        # a copy's similarity equals the positive's, far above LAM: it would be flagged
        assert all(
            float(sim[i, j].detach()) > LAM
            for i in range(len(IDX))
            for j in range(len(IDX))
            if j != i and int(IDX[j]) == int(IDX[i])
        )
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
    want.backward()  # features and the learned temperature
    for got_grad, want_grad in ((img, img2), (txt, txt2), (log_scale, log_scale2)):
        torch.testing.assert_close(got_grad.grad, want_grad.grad, rtol=1e-8, atol=1e-12)


def test_copies_are_not_negatives_in_the_global_loss():
    """Thresholds at 1.0 flag nothing: only the copy rule keeps copies out of ``g``. On a
    first visit ``u = g``; the FastCLIP-v3 surrogate (prefactor detached, ``rho * tau``) is
    checked forward and backward, the learned temperature's gradient included."""
    cfg, obj = _objective("loss.name=fastclip_v3", f"loss.tau={TAU}", "loss.tau_min=0.01", lam=1.0)
    img, txt, log_scale = _leaves()
    out = _step(obj, img, txt, log_scale)
    out.loss.backward()
    img2, txt2, log_scale2 = _leaves()
    tau = torch.exp(-log_scale2)
    want = cfg.loss.rho * tau
    for t, (a, o) in {"img": (img2, txt2), "txt": (txt2, img2)}.items():
        sim = a @ o.T
        g = []
        for i in range(len(IDX)):
            kept = [j for j in range(len(IDX)) if j != i and int(IDX[j]) != int(IDX[i])]
            g.append(sum(torch.exp((sim[i, j] - sim[i, i]) / tau) for j in kept) / len(kept))
        g = torch.stack(g)
        u = g.detach()
        torch.testing.assert_close(out.rows[f"gcl.u_{t}"], u, rtol=1e-10, atol=0)
        want = want + 0.5 * (tau.detach() * (g / u).mean() + tau * torch.log(u).mean())
    torch.testing.assert_close(out.loss, want, rtol=1e-10, atol=1e-12)
    want.backward()
    for got_grad, want_grad in ((img, img2), (txt, txt2), (log_scale, log_scale2)):
        torch.testing.assert_close(got_grad.grad, want_grad.grad, rtol=1e-8, atol=1e-12)


def test_without_repeats_nothing_changes():
    """Distinct indices: no copy mask at all, the same loss as the plain path."""
    cfg, obj = _objective()
    g = torch.Generator().manual_seed(0)
    img = F.normalize(torch.randn(6, D, generator=g, dtype=torch.float64), dim=1)
    txt = F.normalize(torch.randn(6, D, generator=g, dtype=torch.float64), dim=1)
    out = obj(
        img,
        txt,
        torch.tensor(1 / TAU, dtype=torch.float64),
        torch.arange(6),
        torch.full((6,), -1),
        epoch=0,
    )
    assert out.duplicates == 0


def test_write_rows_keeps_the_first_occurrence():
    tables = StateTables(6)
    tables.add("x", -1.0)
    tables.write_rows(
        torch.tensor([3, 1, 3, 2, 1]), {"x": torch.tensor([10.0, 11.0, 12.0, 13.0, 14.0])}
    )
    assert tables["x"].tolist() == [-1.0, 11.0, 13.0, 10.0, -1.0, -1.0]
    assert first_occurrences(torch.tensor([5, 4, 3])) is None
    assert first_occurrences(torch.tensor([2, 2, 0, 2, 0])).tolist() == [2, 0]  # sorted by value
