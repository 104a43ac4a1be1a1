"""Cached gradient accumulation (``optim.accum_mode=cached``, open_clip's ``--accum-freq``):
``k`` micro-batches of ``b`` give the loss, the gradients (the temperature's included), the
detector's flags and the table rows of one step with the batch of ``k * b``, on 1 and on 2
real gloo processes (against one process with the whole global batch)."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from clipfnd import distributed
from clipfnd.config import load_config
from clipfnd.state import StateTables
from clipfnd.testing.gloo import run_group
from clipfnd.train.objective import OBJECTIVES
from clipfnd.train.step import cached_window

N, D_IN, D = 96, 10, 8
K, B = 3, 24  # micro-batches per step, global micro-batch
CONFIGS = {
    "clip": {},
    "clip_glofnd": {"fnd.detector": "glofnd", "fnd.lr": 0.3, "fnd.init_threshold": 0.0},
    "clip_glofnd_attract": {
        "fnd.detector": "glofnd",
        "fnd.lr": 0.3,
        "fnd.init_threshold": 0.0,
        "fnd.removal": "attract",
    },
    "fastclip_v3_glofnd": {
        "loss.name": "fastclip_v3",
        "fnd.detector": "glofnd",
        "fnd.lr": 0.3,
        "fnd.init_threshold": 0.0,
    },
    "simclr_glofnd": {"mode": "simclr", "fnd.detector": "glofnd", "fnd.init_threshold": 0.0},
    # images [b, 2, ...]: the training view, then the clean view GloFND reads (fnd.view=clean)
    "clip_glofnd_clean": {"fnd.detector": "glofnd", "fnd.lr": 0.3, "fnd.init_threshold": 0.0},
}


class Towers(torch.nn.Module):
    """Two linear towers on fixed inputs with a learned ``logit_scale``: the objective's view
    of a CLIP model (``forward(image=, text=)``) and of a SimCLR one (``forward(views)``)."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.wi = torch.nn.Linear(D_IN, D, dtype=torch.float64)
        self.wt = torch.nn.Linear(D_IN, D, dtype=torch.float64)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.logit_scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def forward(self, views=None, image=None, text=None):
        if views is not None:
            return F.normalize(self.wi(views), dim=1)
        return {  # images [b, 1, 1, D_IN] stand for [b, C, H, W]
            "image_features": F.normalize(self.wi(image.flatten(1)), dim=1),
            "text_features": None if text is None else F.normalize(self.wt(text), dim=1),
            "logit_scale": self.logit_scale.exp(),
        }


def _data():
    g = torch.Generator().manual_seed(1)
    return (
        torch.randn(N, D_IN, generator=g, dtype=torch.float64),
        torch.randn(N, D_IN, generator=g, dtype=torch.float64),
        torch.randn(N, D_IN, generator=g, dtype=torch.float64),  # a second view (simclr)
    )


def _batch(idx, mode, clean=False):
    xi, xt, xv = _data()
    b = {"index": idx, "label": idx % 5}
    if mode == "simclr":
        b["image"] = torch.stack([xi[idx], xv[idx]], dim=1)  # [b, 2, D_IN]: two "views"
    elif clean:  # [b, 2, 1, 1, D_IN]: the training view, the clean view
        b["image"], b["text"] = torch.stack([xi[idx], xv[idx]], dim=1)[:, :, None, None], xt[idx]
    else:
        b["image"], b["text"] = xi[idx], xt[idx]
    return b


def _step(rank, world, name, accumulate, epoch=1):
    """One step on this rank: cached over K micro-batches, or one batch of K micro-batches'
    samples. Returns loss, gradients averaged over ranks, and the rows by dataset index."""
    over = CONFIGS[name]
    cfg = load_config(None, ["data.train=unused"] + [f"{k}={v}" for k, v in over.items()])
    mode = cfg.mode
    tables = StateTables(N)
    obj = OBJECTIVES[mode](cfg, tables, has_labels=True)
    if "fnd.detector" in over:  # thresholds that flag something from the first step
        for t in obj.anchor_types:
            tables[f"glofnd.lambda_{t}"].uniform_(
                0.0, 0.4, generator=torch.Generator().manual_seed(2)
            )
    model = Towers()
    order = torch.randperm(N, generator=torch.Generator().manual_seed(3))[: K * B]
    micro = [order[j * B : (j + 1) * B] for j in range(K)]
    b = B // world
    mine = [m[rank * b : (rank + 1) * b] for m in micro]  # this rank's share of each micro-batch
    dev = torch.device("cpu")
    if accumulate:
        out = cached_window(
            obj,
            model,
            [_batch(m, mode, name.endswith("_clean")) for m in mine],
            dev,
            epoch,
            True,
            lambda loss: loss.backward(),
            lambda last: contextlib.nullcontext(),
            lambda loss: distributed.all_true(bool(torch.isfinite(loss)), dev),
        )
    else:  # one process, the whole K*B batch
        whole = _batch(torch.cat(micro), mode, name.endswith("_clean"))
        out = obj.batch_loss(model, whole, dev, epoch, True)
        out.loss.backward()
    grads = {
        n: distributed.all_reduce_sum(p.grad) / world
        for n, p in model.named_parameters()
        if p.grad is not None
    }
    loss = distributed.all_reduce_sum(out.loss.detach()) / world
    index = distributed.gather(out.index)
    rows = {k: distributed.gather(v.detach().to(torch.float64)) for k, v in out.rows.items()}
    det = distributed.all_reduce_sum(out.detection) if out.detection is not None else None
    return loss, grads, index, rows, det


def _compare(got, want):
    loss1, g1, idx1, rows1, det1 = want
    loss2, g2, idx2, rows2, det2 = got
    torch.testing.assert_close(loss2, loss1, atol=1e-10, rtol=0)
    assert set(g2) == set(g1)
    for k in g1:
        torch.testing.assert_close(g2[k], g1[k], atol=1e-10, rtol=1e-9, msg=k)
    assert set(rows2) == set(rows1)
    o1, o2 = torch.argsort(idx1), torch.argsort(idx2)
    assert torch.equal(idx1[o1], idx2[o2])
    for k in rows1:  # every sample's new table row, by dataset index
        torch.testing.assert_close(rows2[k][o2], rows1[k][o1], atol=1e-9, rtol=1e-9, msg=k)
    if det1 is not None:  # detection counts of the whole batch: the same flags
        torch.testing.assert_close(det2, det1, atol=0, rtol=0)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_cached_accumulation_equals_one_large_batch(name):
    want = _step(0, 1, name, accumulate=False)
    got = _step(0, 1, name, accumulate=True)
    _compare(got, want)
    if name != "clip":
        assert any(k.startswith("glofnd.") for k in want[3])
    assert want[1]["logit_scale"].abs() > 0 or name.startswith("simclr")


def _two(rank, world):
    return {name: _step(rank, world, name, accumulate=True) for name in CONFIGS}


@pytest.mark.distributed
def test_cached_accumulation_on_two_processes_equals_one_large_batch():
    results = run_group(_two, 2)
    for name in CONFIGS:
        want = _step(0, 1, name, accumulate=False)
        for r in results:
            _compare(r[name], want)


def test_independent_accumulation_differs():
    """The other mode keeps negatives inside each micro-batch: another objective."""
    cfg = load_config(None, ["data.train=unused"])
    obj = OBJECTIVES["clip"](cfg, StateTables(N), has_labels=True)
    model = Towers()
    order = torch.randperm(N, generator=torch.Generator().manual_seed(3))[: K * B]
    whole = obj.batch_loss(model, _batch(order, "clip"), torch.device("cpu"), 0, False).loss
    parts = [
        obj.batch_loss(
            model, _batch(order[j * B : (j + 1) * B], "clip"), torch.device("cpu"), 0, False
        ).loss
        for j in range(K)
    ]
    assert abs(float(sum(parts).detach() / K) - float(whole.detach())) > 1e-3
