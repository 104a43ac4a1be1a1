"""Vision-only mode, one step at a time: the whole SimCLR objective (views gathered, own column
and copies excluded, detectors, methods) against slow float64 loops of docs/methods.md.

Layout: this rank's rows are view 1 of its b images, then view 2; columns are view 1 of all
B images, then view 2. One process here, so b = B.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipfnd.config import load_config
from clipfnd.fnd.base import DetectionInput, EpochStart
from clipfnd.fnd.clustering import acceptance_ratio
from clipfnd.losses.unimodal import view_columns
from clipfnd.state import StateTables
from clipfnd.train.objective import SimCLRObjective

N, B, D = 40, 8, 6


def _cfg(**over):
    items = ["mode=simclr", "data.train=unused", "model.name=tiny"]
    items += [f"{k}={v}" for k, v in over.items()]
    return load_config(None, items)


def _views(seed=0, b=B):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, D, generator=g, dtype=torch.float64)
    z1 = F.normalize(x + 0.3 * torch.randn(b, D, generator=g, dtype=torch.float64), dim=1)
    z2 = F.normalize(x + 0.3 * torch.randn(b, D, generator=g, dtype=torch.float64), dim=1)
    return torch.cat([z1, z2]).requires_grad_()


def _index(seed=0, b=B):
    return torch.randperm(N, generator=torch.Generator().manual_seed(seed))[:b]


def _negatives(b):
    """``{row: columns of N_i}`` for one process: every column but the row's own and its
    image's other view."""
    out = {}
    for r in range(2 * b):
        i = r % b
        out[r] = [c for c in range(2 * b) if c % b != i]
    return out


# --- SogCLR, unimodal -------------------------------------------------------------------------
@pytest.mark.parametrize("tau", [0.1, 0.5])
@pytest.mark.parametrize("b", [4, 8])
def test_sogclr_unimodal_matches_float64_loop(tau, b):
    cfg = _cfg(**{"loss.name": "sogclr", "loss.tau": tau, "loss.gamma_min": 0.3})
    tables = StateTables(N)
    obj = SimCLRObjective(cfg, tables, has_labels=False)
    index = _index(b=b)
    u0 = torch.rand(N, generator=torch.Generator().manual_seed(5)) + 0.5
    tables["gcl.u_view"].copy_(u0)
    tables["gcl.visits_view"][index[: b // 2]] = 3.0  # half visited before, half not
    epoch = 20  # gamma = gamma_min
    z = _views(b=b)
    out = obj(z, torch.tensor(1 / tau), index, -torch.ones(b, dtype=torch.long), epoch)
    out.loss.backward()

    zr = z.detach().clone().requires_grad_()
    s = zr @ zr.T
    total = 0.0
    us = []
    for r, neg in _negatives(b).items():
        i = r % b
        p = (r + b) % (2 * b)
        g = torch.stack([torch.exp((s[r, j] - s[r, p]) / tau) for j in neg]).mean()
        visited = bool(tables["gcl.visits_view"][index[i]] > 0)
        gamma = 0.3 if visited else 1.0
        u = (1 - gamma) * u0[index[i]].double() + gamma * g.detach()
        us.append(u)
        total = total + tau * g / u
    loss = total / (2 * b)
    loss.backward()
    # u is stored and mixed in the tables' float32: 1e-6 relative
    torch.testing.assert_close(out.loss.detach(), loss.detach(), atol=1e-10, rtol=1e-6)
    torch.testing.assert_close(z.grad, zr.grad, atol=1e-9, rtol=1e-6)
    stored = (torch.stack(us[:b]) + torch.stack(us[b:])) / 2  # one u per image: the views' mean
    torch.testing.assert_close(out.rows["gcl.u_view"], stored, atol=1e-12, rtol=1e-6)
    assert torch.equal(out.rows["gcl.visits_view"], tables["gcl.visits_view"][index] + 1)


# --- GloFND, unimodal -------------------------------------------------------------------------
# the paper's thresholds (placed by hand here, no offset): the rule these references implement
PAPER = {"fnd.init": "constant", "fnd.offset": "false", "fnd.optimizer": "adam"}


@pytest.mark.parametrize("b", [4, 8])
def test_glofnd_unimodal_update_matches_naive_loop(b):
    alpha, lr = 0.2, 0.05
    cfg = _cfg(
        **{"fnd.detector": "glofnd", "fnd.alpha": alpha, "fnd.lr": lr, "loss.tau": 0.5, **PAPER}
    )
    tables = StateTables(N)
    obj = SimCLRObjective(cfg, tables, has_labels=False)
    index = _index(b=b)
    lam0 = torch.rand(N, generator=torch.Generator().manual_seed(3)) * 0.6 - 0.1
    tables["glofnd.lambda_view"].copy_(lam0)
    z = _views(b=b)
    out = obj(z, torch.tensor(2.0), index, -torch.ones(b, dtype=torch.long), epoch=0)

    s = (z @ z.T).detach()
    negs = _negatives(b)
    for i in range(b):
        lam = float(lam0[index[i]])
        above = sum(float(s[r, j]) > lam for r in (i, i + b) for j in negs[r])
        g = alpha - above / (2 * (2 * b - 2))  # K = 2 rows, |N_i| = 2B - 2
        # Adam's first step: mhat = g, vhat = g^2
        expected = max(-1.0, min(1.0, lam - lr * g / (abs(g) + 1e-8)))
        assert out.rows["glofnd.lambda_view"][i].item() == pytest.approx(expected, abs=1e-6)
        assert out.rows["glofnd.count_view"][i].item() == 1.0


def test_glofnd_unimodal_flags_exclude_own_view_and_use_the_thresholds():
    cfg = _cfg(**{"fnd.detector": "glofnd", "fnd.alpha": 0.1, **PAPER})
    tables = StateTables(N)
    obj = SimCLRObjective(cfg, tables, has_labels=False)
    index = _index()
    tables["glofnd.lambda_view"][index] = 0.0
    z = _views()
    pos, self_col = view_columns(B, B, 0)
    not_neg = index.repeat(2)[:, None] == torch.cat([index, index])[None, :]
    not_neg[torch.arange(2 * B), pos] = False
    sims = {"view": (z @ z.T).detach()}
    found = obj.detector.detect(
        DetectionInput(sims, pos, index, None, not_neg, 2 * B - 2, 0, 2, torch.cat([index] * 2))
    )
    flags = found.flags["view"]
    for r in range(2 * B):
        for c in range(2 * B):
            want = c in _negatives(B)[r] and bool(sims["view"][r, c] > 0)
            assert bool(flags[r, c]) == want, (r, c)


# --- IFND -----------------------------------------------------------------------------------
def _ifnd(**over):
    base = {
        "fnd.detector": "ifnd",
        "fnd.num_clusters": "[3,5]",
        "fnd.start_update": 1,
        "fnd.start_mask": 1,
        "fnd.cluster_every": 2,
        "train.epochs": 6,
        "train.progress": "false",
    }
    base.update(over)
    tables = StateTables(N)
    return SimCLRObjective(_cfg(**base), tables, has_labels=True), tables


def _embed():
    g = torch.Generator().manual_seed(11)
    centres = F.normalize(torch.randn(4, D, generator=g), dim=1)
    x = F.normalize(centres[torch.arange(N) % 4] + 0.2 * torch.randn(N, D, generator=g), dim=1)
    order = torch.randperm(N, generator=g)  # any order of dataset indices
    return order, x[order]


def test_ifnd_clusters_on_schedule_and_accepts_the_rising_share():
    obj, tables = _ifnd(**{"fnd.accept_start": 0.25})
    det = obj.detector
    calls = []

    def embed():
        calls.append(1)
        return _embed()

    assert det.start_epoch(0, embed, fresh=True) == EpochStart()  # before start_update
    for epoch in range(1, 6):
        det.start_epoch(epoch, embed, fresh=True).write(tables)
        ratio = acceptance_ratio(epoch, 1, 5, 0.25)
        for g in range(2):
            label = tables[f"ifnd.label_{g}"]
            conf = tables[f"ifnd.confidence_{g}"]
            accepted = label >= 0
            assert int(accepted.sum()) == round(ratio * N)
            # the accepted are the most confident; their label is their cluster
            if 0 < int(accepted.sum()) < N:
                assert conf[accepted].min() >= conf[~accepted].max()
            assert torch.equal(label[accepted], tables[f"ifnd.cluster_{g}"][accepted])
    assert len(calls) == 3  # epochs 1, 3, 5 (cluster_every = 2)
    # a resume inside an epoch does not cluster again, and leaves the tables alone
    before = {n: tables[n].clone() for n in tables.names()}
    det.start_epoch(5, embed, fresh=False).write(tables)
    assert len(calls) == 3
    assert all(torch.equal(before[n], tables[n]) for n in tables.names())


@pytest.mark.parametrize("match", ["any", "all"])
def test_ifnd_flags_exactly_the_accepted_same_cluster_pairs(match):
    obj, tables = _ifnd(**{"fnd.match": match})
    g = torch.Generator().manual_seed(2)
    for k, n_clusters in enumerate((3, 5)):
        label = torch.randint(0, n_clusters, (N,), generator=g).float()
        label[torch.rand(N, generator=g) < 0.3] = -1  # not accepted
        tables[f"ifnd.label_{k}"].copy_(label)
    index = _index()
    index[1] = index[0]  # a copy of image 0 in the batch: never flagged against it
    pos, _ = view_columns(B, B, 0)
    cols = torch.cat([index, index])
    not_neg = index.repeat(2)[:, None] == cols[None, :]
    not_neg[torch.arange(2 * B), pos] = False
    found = obj.detector.detect(
        DetectionInput({}, pos, index, None, not_neg, 2 * B - 4, 1, 2, cols)
    )
    flags = found.flags["view"]
    lab = torch.stack([tables[f"ifnd.label_{k}"] for k in range(2)], dim=1).long()
    for r in range(2 * B):
        a = int(index[r % B])
        for c in range(2 * B):
            j = int(cols[c])
            same = [lab[a, k] >= 0 and lab[a, k] == lab[j, k] for k in range(2)]
            want = (any(same) if match == "any" else all(same)) and j != a
            assert bool(flags[r, c]) == bool(want), (r, c)


# --- SSCL inside the objective -----------------------------------------------------------------
def test_sscl_draws_depend_on_the_batch_not_on_the_call():
    cfg = _cfg(**{"loss.name": "sscl", "loss.tau": 0.5, "loss.top_k": 4, "loss.num_synthetic": 6})
    obj = SimCLRObjective(cfg, StateTables(N), has_labels=False)
    z, index, label = _views(), _index(), -torch.ones(B, dtype=torch.long)
    a = obj(z, torch.tensor(2.0), index, label, epoch=1).loss
    b = obj(z, torch.tensor(2.0), index, label, epoch=1).loss
    c = obj(z, torch.tensor(2.0), index, label, epoch=2).loss
    assert a.item() == b.item()  # same batch, same epoch: same synthetic negatives
    assert a.item() != c.item()
    nosyn = _cfg(**{"loss.name": "hcl", "loss.tau": 0.5})
    h = SimCLRObjective(nosyn, StateTables(N), has_labels=False)(
        z, torch.tensor(2.0), index, label, 1
    )
    assert math.isfinite(h.loss.item()) and h.loss.item() != a.item()


def test_simclr_objective_is_nt_xent_over_2B_views():
    tau = 0.3
    obj = SimCLRObjective(_cfg(**{"loss.name": "simclr", "loss.tau": tau}), StateTables(N), False)
    z = _views()
    out = obj(z, torch.tensor(1 / tau, dtype=torch.float64), _index(), -torch.ones(B).long(), 0)
    s = (z @ z.T).detach()
    total = 0.0
    for r, neg in _negatives(B).items():
        p = (r + B) % (2 * B)
        den = math.exp(s[r, p] / tau) + sum(math.exp(s[r, j] / tau) for j in neg)
        total += -math.log(math.exp(s[r, p] / tau) / den)
    assert out.loss.item() == pytest.approx(total / (2 * B), rel=1e-10)


def test_mode_checks_name_the_key():
    from clipfnd.config import ConfigError
    from clipfnd.registry import load_run_config

    with pytest.raises(ConfigError, match="loss.name='dcl' is for mode simclr"):
        load_run_config(None, ["data.train=x", "loss.name=dcl"])
    with pytest.raises(ConfigError, match="fnd.detector='ifnd' is for mode simclr"):
        load_run_config(None, ["data.train=x", "fnd.detector=ifnd"])
    with pytest.raises(ConfigError, match="loss.name='clip' is for mode clip"):
        load_run_config(None, ["data.train=x", "mode=simclr", "loss.name=clip"])
    with pytest.raises(ConfigError, match="in mode simclr each must be one of knn"):
        load_run_config(
            None, ["data.train=x", "mode=simclr", "loss.name=simclr", "eval.tasks=[retrieval]"]
        )
    cfg = load_run_config(None, ["data.train=x", "mode=simclr", "loss.name=simclr"])
    assert cfg.eval.tasks == ["knn"]


@pytest.mark.parametrize("name", ["adamw", "sgd", "lars"])
def test_optimizer_choice_steps_and_spares_frozen_temperature(name):
    from clipfnd.models.vision import create_vision
    from clipfnd.train.build import build_optimizer, param_groups

    cfg = _cfg(**{"optim.name": name, "optim.lr": 0.1, "optim.weight_decay": 1e-4})
    model = create_vision("tiny", proj_hidden=16, proj_dim=8).model
    obj = SimCLRObjective(cfg, StateTables(N), has_labels=False)
    temperature = obj.method.temperature_policy()
    temperature.apply(model)
    opt = build_optimizer(param_groups(model, cfg.optim.weight_decay, temperature), cfg)
    assert type(opt).__name__.lower() == name
    before = [p.detach().clone() for p in model.parameters()]
    z = model(torch.randn(2 * B, 3, 16, 16))
    obj(z, model.logit_scale.exp(), _index(), -torch.ones(B).long(), 0).loss.backward()
    opt.step()
    moved = [not torch.equal(a, p) for a, p in zip(before, model.parameters())]
    assert sum(moved) >= len(moved) - 1  # everything but the frozen logit_scale
    assert model.logit_scale.item() == pytest.approx(math.log(1 / cfg.loss.tau))
