"""GloFND thresholds: the update rule against a naive loop, convergence to the quantile,
schedules, and the objective's use of them (docs/methods.md, "GloFND")."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from clip_path import clip_loss

from clipfnd.config import FNDConfig, load_config
from clipfnd.fnd import GloFND
from clipfnd.state import StateTables, TableIndexError
from clipfnd.train.objective import ClipObjective

# the paper's thresholds: a constant start (1.0), no offset (these tests check its rule)
PAPER = {"init": "constant", "offset": False}
PAPER_ITEMS = ["fnd.init=constant", "fnd.offset=false"]


def update(det, anchor_type, index, sims, exclude, num_negatives, epoch=0):
    """New rows for anchors ``index`` from their ``K`` similarity rows (``sims``: ``K`` tensors
    ``[b, M]``; ``exclude``: per row set, the columns that are no negatives): the flags at the
    stored thresholds, then the update training makes (``update_from_flags``)."""
    lam = det.tables.rows(f"glofnd.lambda_{anchor_type}", index, sims[0].device)
    flags = [det.flags(s, lam, ex) for s, ex in zip(sims, exclude)]
    return det.update_from_flags(anchor_type, index, flags, num_negatives, epoch=epoch)


def unit(n, d, seed):
    return F.normalize(torch.randn(n, d, generator=torch.Generator().manual_seed(seed)), dim=1)


@pytest.mark.parametrize("alpha", [0.02, 0.05, 0.2])
def test_thresholds_converge_to_quantile(alpha):
    """From mini-batches only, each lambda_n approaches the (1-alpha) quantile of s_n."""
    N, B = 1024, 256
    X = unit(N, 6, 0)
    S = X @ X.T
    g = torch.Generator().manual_seed(1)
    tables = StateTables(N)
    det = GloFND.from_config(FNDConfig(alpha=alpha, lr=0.02, **PAPER), tables, ("view",))
    for epoch in range(120):
        if epoch == 60:
            det.lr = 0.005  # a smaller step for the last half, as any SGD run would anneal
        perm = torch.randperm(N, generator=g)
        for k in range(N // B):
            idx = perm[k * B : (k + 1) * B]
            tables.write_rows(
                idx, update(det, "view", idx, [S[idx][:, idx]], [[torch.arange(B)]], B - 1)
            )
    others = S.masked_select(~torch.eye(N, dtype=torch.bool)).view(N, N - 1)
    target = torch.quantile(others, 1 - alpha, dim=1)
    err = (tables["glofnd.lambda_view"] - target).abs()
    assert err.mean() < 0.01
    assert err.quantile(0.9) < 0.02, f"90% of anchors within 0.02: got p90 {err.quantile(0.9):.4f}"


def naive_glofnd(steps, N, alpha, lr, b1, b2, optimizer, epochs=None, bias="sample"):
    """Per-sample loop of docs/methods.md's update, in float64. ``bias="epoch"``: the reference
    code's bias correction, ``t = epoch + 1`` (``epochs[k]``: the epoch of step ``k``)."""
    lam = [1.0] * N
    m = [0.0] * N
    v = [0.0] * N
    c = [0] * N
    for k, (idx, sims, negs) in enumerate(steps):
        new = {}
        for r, n in enumerate(idx.tolist()):
            above = total = 0
            for s, neg in zip(sims, negs):
                for j in range(s.shape[1]):
                    if neg[r, j]:
                        total += 1
                        above += float(s[r, j]) > lam[n]
            gr = alpha - above / total
            cn = c[n] + 1
            if optimizer == "sgd":
                new[n] = (min(1.0, max(-1.0, lam[n] - lr * gr)), m[n], v[n], cn)
                continue
            mn = b1 * m[n] + (1 - b1) * gr
            vn = b2 * v[n] + (1 - b2) * gr * gr
            t = cn if bias == "sample" else epochs[k] + 1
            mhat = mn / (1 - b1**t)
            vhat = vn / (1 - b2**t)
            new[n] = (
                min(1.0, max(-1.0, lam[n] - lr * mhat / (math.sqrt(vhat) + 1e-8))),
                mn,
                vn,
                cn,
            )
        for n, (a, mm, vv, cc) in new.items():
            lam[n], m[n], v[n], c[n] = a, mm, vv, cc
    return lam, c


@pytest.mark.parametrize(
    "optimizer,bias", [("adam", "sample"), ("sgd", "sample"), ("adam", "epoch")]
)
@pytest.mark.parametrize("views", [1, 2])
def test_update_matches_naive_loop(optimizer, bias, views):
    """Resampled batches (uneven visit counts) exercise the per-sample bias correction;
    ``views=2`` is the unimodal case (two rows per anchor share one threshold)."""
    N, B, d = 40, 8, 4
    alpha, lr = 0.1, 0.3
    g = torch.Generator().manual_seed(7)
    X = unit(N, d, 3)
    steps = []
    for _ in range(25):
        idx = torch.randperm(N, generator=g)[:B]
        rows = []
        negs = []
        excludes = []
        for _view in range(views):
            noisy = F.normalize(X[idx] + 0.3 * torch.randn(B, d, generator=g), dim=1)
            others = torch.cat([X[idx], noisy]) if views == 2 else X[idx]
            rows.append(noisy @ others.T)
            neg = torch.ones(B, others.shape[0], dtype=torch.bool)
            neg[torch.arange(B), torch.arange(B)] = False
            excludes.append([torch.arange(B)])
            if views == 2:
                neg[torch.arange(B), torch.arange(B) + B] = False
                excludes[-1].append(torch.arange(B) + B)
            negs.append(neg)
        steps.append((idx, rows, negs, excludes))
    tables = StateTables(N)
    det = GloFND.from_config(
        FNDConfig(alpha=alpha, lr=lr, optimizer=optimizer, bias_correction=bias, **PAPER),
        tables,
        ("a",),
    )
    epochs = [
        15 + k // 5 for k in range(len(steps))
    ]  # updates starting at epoch 15, as the paper's
    for (idx, rows, negs, excludes), epoch in zip(steps, epochs):
        tables.write_rows(
            idx, update(det, "a", idx, rows, excludes, int(negs[0][0].sum()), epoch=epoch)
        )
    lam, counts = naive_glofnd(
        [st[:3] for st in steps], N, alpha, lr, 0.9, 0.98, optimizer, epochs, bias
    )
    torch.testing.assert_close(
        tables["glofnd.lambda_a"], torch.tensor(lam, dtype=torch.float32), atol=2e-6, rtol=0
    )
    assert tables["glofnd.count_a"].tolist() == [float(c) for c in counts]
    assert len(set(counts)) > 1  # visit counts really differ


def test_thresholds_start_at_one_and_stay_clamped():
    tables = StateTables(4)
    det = GloFND.from_config(
        FNDConfig(alpha=0.5, lr=10.0, optimizer="sgd", **PAPER), tables, ("a",)
    )
    assert tables["glofnd.lambda_a"].tolist() == [1.0] * 4
    sims = torch.full((4, 4), -1.0)
    for _ in range(3):  # g = alpha > 0 pushes lambda down, hard
        tables.write_rows(
            torch.arange(4), update(det, "a", torch.arange(4), [sims], [[torch.arange(4)]], 3)
        )
    assert tables["glofnd.lambda_a"].tolist() == [-1.0] * 4


def test_flags_and_gradient_definition():
    tables = StateTables(3)
    det = GloFND.from_config(FNDConfig(alpha=0.25, **PAPER), tables, ("a",))
    lam = torch.tensor([0.5, 0.0, 0.9])
    sim = torch.tensor([[1.0, 0.6, 0.4, 0.7], [0.1, 1.0, 0.2, -0.3], [0.95, 0.91, 1.0, 0.2]])
    flags = det.flags(sim, lam, [torch.arange(3)])  # the positive of row i is column i
    assert flags.tolist() == [
        [False, True, False, True],
        [True, False, True, False],
        [True, True, False, False],
    ]
    g = det.gradient([flags], 3)
    torch.testing.assert_close(g, torch.tensor([0.25 - 2 / 3, 0.25 - 2 / 3, 0.25 - 2 / 3]))


def test_index_out_of_range_is_a_clear_error():
    tables = StateTables(10)
    with pytest.raises(
        TableIndexError, match="dataset index 12 is outside the per-sample tables of 10 rows"
    ):
        tables.check_indices(torch.tensor([1, 12]))


def _cfg(**over):
    """A run config with the paper's thresholds (a constant start, no offset): the rule these
    tests check; the calibration options are tests/test_glofnd_calibration.py's."""
    items = ["data.train=unused", *PAPER_ITEMS] + [f"{k}={v}" for k, v in over.items()]
    return load_config(None, items)


def test_oracle_without_labels_is_refused():
    with pytest.raises(ValueError, match="oracle needs labels"):
        ClipObjective(_cfg(**{"fnd.detector": "oracle"}), StateTables(8), has_labels=False)


def _batch(b=8, d=6, seed=0):
    img, txt = unit(b, d, seed), unit(b, d, seed + 1)
    return img, txt, torch.tensor(10.0), torch.arange(b), torch.arange(b) % 3


def test_objective_before_start_mask_equals_plain_clip_and_updates_only_from_start_update():
    cfg = _cfg(
        **{"fnd.detector": "glofnd", "fnd.start_update": 1, "fnd.start_mask": 2, "fnd.lr": 0.5}
    )
    tables = StateTables(8)
    obj = ClipObjective(cfg, tables, has_labels=True)
    img, txt, scale, idx, lab = _batch()
    plain = clip_loss(img, txt, img, txt, scale)
    out0 = obj(img, txt, scale, idx, lab, epoch=0)
    torch.testing.assert_close(out0.loss, plain)
    assert tables["glofnd.lambda_img"].tolist() == [1.0] * 8  # no update before start_update
    out1 = obj(img, txt, scale, idx, lab, epoch=1)
    assert tables["glofnd.lambda_img"].tolist() == [1.0] * 8  # nothing written before commit
    obj.commit(out1)
    torch.testing.assert_close(out1.loss, plain)  # updating, not yet masking
    assert (tables["glofnd.lambda_img"] < 1.0).all() and (tables["glofnd.lambda_txt"] < 1.0).all()
    assert out1.detection is None
    out2 = obj(img, txt, scale, idx, lab, epoch=2)
    assert out2.detection is not None


def test_objective_masks_use_cross_modal_similarity_and_pre_update_thresholds():
    cfg = _cfg(**{"fnd.detector": "glofnd", "fnd.rescale": "false"})
    tables = StateTables(8)
    obj = ClipObjective(cfg, tables, has_labels=False)
    img, txt, scale, idx, lab = _batch(seed=4)
    tables["glofnd.lambda_img"].fill_(0.0)
    tables["glofnd.lambda_txt"].fill_(0.3)
    out = obj(img, txt, scale, idx, torch.full((8,), -1), epoch=0)
    s = img @ txt.T
    eye = torch.eye(8, dtype=torch.bool)
    fn_i = (s > 0.0) & ~eye
    fn_t = (s.T > 0.3) & ~eye
    torch.testing.assert_close(
        out.loss, clip_loss(img, txt, img, txt, scale, 0, fn_i, fn_t, "eliminate", False)
    )
