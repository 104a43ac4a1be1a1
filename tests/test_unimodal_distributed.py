"""Vision-only mode: 2 processes equal 1 process (real gloo groups on the CPU), over several
steps of the whole SimCLR objective: losses, parameters and every per-sample table, for
GloFND (on NT-Xent and SogCLR), the oracle, SSCL's synthetic negatives and IFND's
clustering."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipfnd import distributed
from clipfnd.config import load_config
from clipfnd.state import StateTables
from clipfnd.testing.gloo import run_group
from clipfnd.train.objective import SimCLRObjective

pytestmark = pytest.mark.distributed

N, B, D_IN, D = 48, 16, 10, 8
CONFIGS = {
    "simclr_glofnd": {"fnd.detector": "glofnd", "fnd.start_mask": 1, "fnd.lr": 0.3},
    "sogclr_glofnd_attract": {
        "loss.name": "sogclr",
        "fnd.detector": "glofnd",
        "fnd.start_mask": 1,
        "fnd.lr": 0.3,
        "fnd.removal": "attract",
        "loss.gamma_decay_epochs": 2,
    },
    "dcl_oracle": {"loss.name": "dcl", "fnd.detector": "oracle"},
    "sscl": {"loss.name": "sscl", "loss.top_k": 6, "loss.num_synthetic": 10},
    "simclr_ifnd": {
        "fnd.detector": "ifnd",
        "fnd.num_clusters": "[4,7]",
        "fnd.start_update": 1,
        "fnd.start_mask": 1,
        "fnd.accept_start": 0.5,
    },
    # every image twice in the global batch, copies on both ranks
    "hcl_glofnd_repeats": {
        "loss.name": "hcl",
        "fnd.detector": "glofnd",
        "fnd.lr": 0.3,
        "repeats": True,
    },
}
STEPS, PER_EPOCH = 8, 3


def run_steps(rank: int, world: int, overrides: dict):
    overrides = dict(overrides)
    repeats = overrides.pop("repeats", False)
    items = ["mode=simclr", "data.train=unused", "loss.tau=0.3", "train.epochs=3"]
    items += ["train.progress=false"] + [f"{k}={v}" for k, v in overrides.items()]
    cfg = load_config(None, items)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N, D_IN, generator=g, dtype=torch.float64)
    labels = torch.arange(N) % 5
    net = torch.nn.Linear(D_IN, D, dtype=torch.float64)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    tables = StateTables(N)
    obj = SimCLRObjective(cfg, tables, has_labels=True)

    def embed():  # the whole set, un-augmented; identical on every process
        with torch.no_grad():
            return torch.arange(N), F.normalize(net(x), dim=1)

    b = B // world
    losses = []
    for step in range(STEPS):
        epoch = step // PER_EPOCH
        if step % PER_EPOCH == 0:
            obj.detector.start_epoch(epoch, embed, fresh=True).write(obj.tables)
        gen = torch.Generator().manual_seed(100 + step)
        order = torch.randperm(N, generator=gen)[:B]
        if repeats:
            half = order[: B // 2]
            order = torch.cat([half, half])[torch.randperm(B, generator=gen)]
        noise = 0.2 * torch.randn(2, N, D_IN, generator=gen, dtype=torch.float64)
        idx = order[rank * b : (rank + 1) * b]
        views = torch.cat([x[idx] + noise[0, idx], x[idx] + noise[1, idx]])
        z = F.normalize(net(views), dim=1)
        out = obj(z, torch.tensor(1 / 0.3, dtype=torch.float64), idx, labels[idx], epoch)
        obj.commit(out)
        out.loss.backward()
        for p in net.parameters():
            p.grad = distributed.all_reduce_sum(p.grad) / world
        opt.step()
        opt.zero_grad()
        losses.append(distributed.all_reduce_sum(out.loss.detach()).item() / world)
    return (
        losses,
        {k: v.clone() for k, v in tables.state_dict()["tables"].items()},
        [p.detach().clone() for p in net.parameters()],
    )


def _worker(rank, world):
    return {name: run_steps(rank, world, over) for name, over in CONFIGS.items()}


@pytest.fixture(scope="module")
def two_process_runs():
    return run_group(_worker, 2)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_unimodal_two_processes_equal_one(name, two_process_runs):
    losses1, tables1, params1 = run_steps(0, 1, CONFIGS[name])
    for losses2, tables2, params2 in (r[name] for r in two_process_runs):
        assert losses2 == pytest.approx(losses1, abs=1e-6, rel=0)
        assert set(tables2) == set(tables1)
        for key in tables1:
            rtol = 1e-6 if key.startswith("gcl.u_") else 0.0
            torch.testing.assert_close(tables2[key], tables1[key], atol=1e-6, rtol=rtol, msg=key)
        for p1, p2 in zip(params1, params2):
            torch.testing.assert_close(p2, p1, atol=1e-6, rtol=0)
    # not comparable from step to step: the global loss (~tau whatever u is), and a loss whose
    # flags (GloFND's, from the first step) change what it sums over
    if not name.startswith("sogclr") and "glofnd" not in name:
        assert losses1[-1] < losses1[0]  # it trains
    if "glofnd" in name:
        assert (tables1["glofnd.lambda_view"] < 1.0).any()
    if "ifnd" in name:
        labels = tables1["ifnd.label_0"]
        # clustered at epochs 1 and 2; half accepted at epoch 1, all at the last (2)
        assert int((labels >= 0).sum()) == N
        assert torch.equal(labels, tables1["ifnd.cluster_0"])
