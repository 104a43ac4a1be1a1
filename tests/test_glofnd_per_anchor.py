"""GloFND per anchor (docs/methods.md, "Per-anchor calibration"): the measure against a slow
float64 computation by hand, the quantile rule, and the three faults of the calibrated rule
(a quantile start that over-flagged where a row expects less than one flag, a stored
threshold clamped as if no offset existed, a histogram that folded what lay outside it)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipfnd.config import FNDConfig
from clipfnd.fnd import DetectionInput, GloFND
from clipfnd.fnd.calibration import histogram
from clipfnd.fnd.glofnd import anchor_spread, spread_terms, visit_quantile
from clipfnd.fnd.per_anchor import BAND, measure
from clipfnd.state import StateTables


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def _glofnd(n, types=("img", "txt"), **kw) -> GloFND:
    return GloFND.from_config(FNDConfig(**kw), StateTables(n), types)


def _input(index, img, txt, epoch=0, **kw):
    sims = {"img": (img[index] @ txt.T).float(), "txt": (txt[index] @ img.T).float()}
    return DetectionInput(sims, index, index, None, None, txt.shape[0] - 1, epoch, **kw)


def _by_hand(anchors, columns, own, thresholds, alpha):
    """The measure, one anchor and one similarity at a time (float64 Python numbers)."""
    A, N = anchors.shape[0], columns.shape[0]
    sims = [
        [float(anchors[a] @ columns[j]) for j in range(N) if j != int(own[a])] for a in range(A)
    ]
    counts = [sum(s > float(thresholds[a]) for s in row) for a, row in enumerate(sims)]
    quantile = []
    for row in sims:
        xs = sorted(row)
        h = (len(xs) - 1) * (1 - alpha)
        lo = math.floor(h)
        quantile.append(xs[lo] + (h - lo) * (xs[min(lo + 1, len(xs) - 1)] - xs[lo]))
    every = sorted((s for row in sims for s in row), reverse=True)
    total = sum(counts)
    g = every[total] if total < len(every) else every[-1] - 1
    global_counts = [sum(s > g for s in row) for row in sims]
    ratio = [c / (N - 1) / alpha for c in counts]
    global_ratio = [c / (N - 1) / alpha for c in global_counts]
    gap = [float(thresholds[a]) - quantile[a] for a in range(A)]
    return ratio, global_ratio, gap, g


@pytest.mark.parametrize("seed", [0, 1])
def test_the_measure_is_the_slow_float64_one(seed):
    A, N, alpha = 40, 90, 0.1
    cols = _unit(N, 6, seed)
    anchors = _unit(A, 6, seed + 10)
    own = torch.randint(0, N, (A,), generator=torch.Generator().manual_seed(seed))
    thr = torch.rand(A, generator=torch.Generator().manual_seed(seed + 20), dtype=torch.float64)
    thr = thr * 0.8 - 0.1
    m = measure(anchors, cols, own, thr, alpha, chunk=7)  # chunks that do not divide A
    ratio, global_ratio, gap, g = _by_hand(anchors, cols, own, thr, alpha)
    assert m.negatives == N - 1
    torch.testing.assert_close(m.ratio, torch.tensor(ratio, dtype=torch.float64))
    torch.testing.assert_close(m.global_ratio, torch.tensor(global_ratio, dtype=torch.float64))
    torch.testing.assert_close(m.gap, torch.tensor(gap, dtype=torch.float64))
    assert m.global_threshold == pytest.approx(g, abs=1e-12)
    within = sum(BAND[0] <= r <= BAND[1] for r in ratio) / A
    assert m.within == pytest.approx(within)
    assert m.global_within == pytest.approx(sum(BAND[0] <= r <= BAND[1] for r in global_ratio) / A)
    # the global threshold flags the same total as the per-anchor ones (no ties here)
    assert sum(global_ratio) == pytest.approx(sum(ratio))


def test_own_quantiles_are_calibrated_per_anchor_and_one_threshold_is_not():
    """Anchors whose similarities sit at different levels: each anchor's own quantile flags
    alpha of its own negatives (all within the band); one threshold flagging the same total
    flags the high anchors' negatives and none of the low ones'. The measure tells them apart
    (and would not, were it true by construction for any thresholds)."""
    A, N, alpha = 60, 400, 0.05
    g = torch.Generator().manual_seed(3)
    cols = _unit(N, 8, 4)
    anchors = _unit(A, 8, 5)
    shift = torch.linspace(-0.5, 0.5, A, dtype=torch.float64)
    # similarity = a . c + shift_a: an extra column carries each anchor's own level
    a2 = torch.cat([anchors, shift[:, None]], 1)
    c2 = torch.cat([cols, torch.ones(N, 1, dtype=torch.float64)], 1)
    own = torch.randint(0, N, (A,), generator=g)
    sims = a2 @ c2.T
    sims[torch.arange(A), own] = float("nan")
    q = torch.nanquantile(sims, 1 - alpha, dim=1)
    m = measure(a2, c2, own, q, alpha)
    assert m.within == 1.0 and m.median_gap == pytest.approx(0.0, abs=1e-12)
    assert m.global_within < 0.4
    flat = measure(a2, c2, own, torch.full((A,), float(q.median())), alpha)
    assert flat.within < 0.4


def test_a_visits_estimate_has_expected_exceedance_alpha():
    """visit_quantile: over many batches of 127 negatives from one distribution, the share of
    that distribution above the estimate averages alpha (torch.quantile's would be 1.4 x)."""
    alpha, n, trials = 0.02, 127, 4000
    g = torch.Generator().manual_seed(0)
    x = torch.rand(trials, n, generator=g, dtype=torch.float64)  # uniform: exceedance = 1 - v
    neg = torch.ones(trials, n, dtype=torch.bool)
    est = visit_quantile(x, neg, alpha, 1)
    assert float((1 - est).mean()) == pytest.approx(alpha, rel=0.05)
    plain = torch.quantile(x, 1 - alpha, dim=1)
    assert float((1 - plain).mean()) / alpha > 1.3
    # by hand, one row: the alpha (n + 1)-th largest, interpolated
    row = sorted(x[0].tolist(), reverse=True)
    r = alpha * (n + 1) - 1
    lo = math.floor(r)
    assert float(est[0]) == pytest.approx(row[lo] + (r - lo) * (row[lo + 1] - row[lo]))
    # a row expecting less than one flag has no estimate
    assert torch.isnan(visit_quantile(x[:2], neg[:2], 0.005, 1)).all()


def test_the_quantile_rule_moves_each_threshold_toward_its_visits_estimate():
    """fnd.optimizer=quantile: a first visit starts at its estimate; later visits move by
    max(1 / visits, fnd.quantile_weight) toward the new estimate (no offset here)."""
    n, alpha, w = 30, 0.1, 0.5
    det = _glofnd(n, alpha=alpha, optimizer="quantile", quantile_weight=w, offset=False)
    index = torch.arange(n)
    lam = {}
    for visit, seed in enumerate((0, 2, 4), start=1):
        img, txt = _unit(n, 5, seed), _unit(n, 5, seed + 1)
        found = det.detect(_input(index, img, txt, epoch=visit - 1))
        for t, (a, b) in {"img": (img, txt), "txt": (txt, img)}.items():
            s = (a @ b.T).float()
            neg = ~torch.eye(n, dtype=torch.bool)
            est = visit_quantile(s, neg, alpha, 1).float()
            want = est if visit == 1 else lam[t] + max(1 / visit, w) * (est - lam[t])
            torch.testing.assert_close(found.rows[f"glofnd.lambda_{t}"], want, atol=1e-6, rtol=0)
            lam[t] = want
        det.tables.write_rows(index, found.rows)
        det.after_step(found.stats, masked=False)


def test_a_quantile_start_below_one_flag_per_row_flags_alpha_not_the_hardest_negative():
    """alpha x (negatives + 1) < 1: an anchor's own negatives hold no value with exceedance
    alpha, and the start used to be the quantile between its two hardest, flagging 1 of its
    negatives (here 1/63 = 3.2 x alpha). The start is now the global batch's quantile: over a
    first visit the batch flags about alpha, as it does with the offset afterwards."""
    n, alpha = 64, 0.005  # 63 negatives per row: 0.32 flags expected; 20 in the batch
    img, txt = _unit(n, 8, 1), _unit(n, 8, 2)
    det = _glofnd(n, alpha=alpha, queue=0)  # defaults but the queue: init quantile, offset on
    det.check_batch(n, n - 1)
    assert det.optimizer == "adam"  # auto: below one flag per row
    with_queue = _glofnd(n, alpha=alpha)  # the default queue of 1024 columns: 5.4 flags a row
    with_queue.check_batch(n, n - 1)
    assert with_queue.optimizer == "quantile"
    # its first step: the queue is empty, so the start is the batch's too
    first = with_queue.detect(_input(torch.arange(n), img, txt))
    assert torch.equal(
        first.rows["glofnd.lambda_img"],
        det.detect(_input(torch.arange(n), img, txt)).rows["glofnd.lambda_img"],
    )
    found = det.detect(_input(torch.arange(n), img, txt))
    for t in ("img", "txt"):
        flagged, negatives = found.stats[f"glofnd.flagged_{t}"].tolist()
        assert flagged / negatives / alpha <= 1.5, (t, flagged, negatives)
        assert flagged / negatives / alpha >= 0.5


def test_a_stored_threshold_follows_the_offset_within_bounds():
    """With the offset on, a stored threshold is relative to it: an Adam step may take it
    below -1 (a similarity of 0.2 less an offset of 1.5) and a start is stored within the same
    bounds; with or without a visit, lambda + offset stays in [-1, 1] (it used to be clamped to
    [-1, 1] itself after an update, and stored unclamped at a start)."""
    n, alpha = 16, 0.1
    img, txt = _unit(n, 4, 0), _unit(n, 4, 1)
    det = _glofnd(n, alpha=alpha, optimizer="adam", init="constant", offset=True)
    det.offsets = {"img": 1.5, "txt": 1.5}
    index = torch.arange(n)
    rows = det.update_from_flags("img", index, [torch.zeros(n, n, dtype=torch.bool)], n - 1, 0, 1.5)
    lam = rows["glofnd.lambda_img"]
    # lambda starts at 1.0 (init_threshold) and is clamped to 1 - offset = -0.5 at most
    assert torch.all(lam <= -0.5 + 1e-6) and torch.all(lam >= -2.5 - 1e-6)
    starts = GloFND._bounded(torch.tensor([0.9, -0.95, 0.3]), 1.5)
    torch.testing.assert_close(starts, torch.tensor([-0.6, -2.45, -1.2]))
    assert torch.all((starts + 1.5).abs() <= 1.0 + 1e-6)
    # a real step with thresholds far below: the residuals stay inside the histogram
    det.tables["glofnd.lambda_img"].fill_(-2.4)
    det.tables["glofnd.count_img"].fill_(2)
    found = det.detect(_input(index, img, txt))
    assert found.stats["glofnd.flagged_img"][0] > 0


def test_the_histogram_refuses_what_lies_outside_it():
    assert int(histogram(torch.tensor([-2.0, 0.0, 2.0])).sum()) == 3
    with pytest.raises(ValueError, match="outside the histogram"):
        histogram(torch.tensor([0.1, 2.5]))
    with pytest.raises(ValueError, match="outside the histogram"):
        histogram(torch.tensor([-2.01]))


def test_the_spread_separates_anchors_that_differ_from_binomial_noise():
    """anchor_spread: anchors that all flag alpha of their negatives give about 0 (their counts
    vary only binomially); anchors with shares of 0.2 x and 1.8 x alpha give about 0.8."""
    g = torch.Generator().manual_seed(0)
    alpha, n, rows = 0.05, 400, 2000
    neg = torch.ones(rows, n, dtype=torch.bool)
    same = torch.rand(rows, n, generator=g) < alpha
    assert anchor_spread(spread_terms(same, neg, alpha, 1)) < 0.1
    p = torch.where(torch.arange(rows) % 2 == 0, 0.2 * alpha, 1.8 * alpha)
    mixed = torch.rand(rows, n, generator=g) < p[:, None]
    assert anchor_spread(spread_terms(mixed, neg, alpha, 1)) == pytest.approx(0.8, abs=0.08)
    assert anchor_spread([0.0, 0.0, 0.0]) is None


def _logged(rank: int, world: int) -> dict[str, float]:
    """What the training loop logs for a bank of 50 samples and 20 anchors, the thresholds in
    replicated tables (1 process) or sharded over the processes."""
    from clipfnd.fnd.per_anchor import from_tables
    from clipfnd.state import ShardedTables

    n = 60
    feats = {"img": _unit(n, 6, 0).float(), "txt": _unit(n, 6, 1).float()}
    index = torch.arange(n) * 2 % n + (torch.arange(n) * 2 >= n)  # dataset indices, permuted
    tables = StateTables(n) if world == 1 else ShardedTables(n, rank=rank, world=world)
    g = torch.Generator().manual_seed(7)
    for t in ("img", "txt"):
        lam, count = tables.add(f"glofnd.lambda_{t}"), tables.add(f"glofnd.count_{t}")
        full_lam = torch.rand(n, generator=g) * 0.6 - 0.3
        full_count = (torch.arange(n) % 5 != 0).float()  # every fifth never visited
        rows = torch.arange(n) if world == 1 else torch.arange(rank, n, world)
        lam.copy_(full_lam[rows])
        count.copy_(full_count[rows])
    pick = torch.randperm(n, generator=torch.Generator().manual_seed(3))[:20].sort().values
    offsets = {"img": 0.05, "txt": -0.02}
    return from_tables(feats, {"img": "txt", "txt": "img"}, index, pick, tables, offsets, 0.1)


def test_two_processes_log_the_per_anchor_measure_of_one():
    from clipfnd.testing.gloo import run_group

    one = _logged(0, 1)
    assert one["fnd/anchors_img_measured"] < 20  # the anchors never visited are left out
    for rank_result in run_group(_logged, 2):
        assert rank_result == one


def _feature_input(index, img, txt, ids, epoch=0):
    """A CLIP step with its features, as the objective hands them to a detector that asks."""
    inp = _input(index, img, txt, epoch)
    inp.features = {
        "img": (img[index].float(), txt.float()),
        "txt": (txt[index].float(), img.float()),
    }
    inp.column_ids = ids
    return inp


def test_the_queue_adds_recent_columns_to_each_visits_estimate():
    """fnd.queue: a visit's estimate reads the batch's negatives and the columns of the last
    steps (newest first, at most fnd.queue), less any column of the anchor's own sample; the
    queue is the same slice of every step's columns whichever process holds it."""
    n, alpha, q = 12, 0.1, 20
    det = _glofnd(n, alpha=alpha, optimizer="quantile", queue=q, offset=False)
    batches = [(_unit(n, 5, 2 * s), _unit(n, 5, 2 * s + 1)) for s in range(3)]
    ids = [torch.arange(n) + 100 * (s + 1) for s in range(3)]  # the columns' dataset indices
    ids[2] = torch.arange(n)  # the third batch is the anchors' own samples again
    for s in range(2):
        img, txt = batches[s]
        det.detect(_feature_input(torch.arange(n), img, txt, ids[s]))
        assert det.queue["img"] is None if s == 0 else det.queue["img"].shape == (n, 5)
        det.after_step({}, masked=False)
    # newest first, cut at q: the second batch's 12 texts, then 8 of the first's
    want = torch.cat([batches[1][1], batches[0][1]])[:q].float()
    torch.testing.assert_close(det.queue["img"], want)
    assert det.queue_ids["img"].tolist() == (ids[1].tolist() + ids[0].tolist())[:q]
    # an estimate over the batch (11 negatives) and the queue (20 columns, none its own)
    img, txt = batches[2]
    index = torch.arange(n)
    est = det._estimate(
        "img",
        (img @ txt.T).float(),
        ~torch.eye(n, dtype=torch.bool),
        1,
        _feature_input(index, img, txt, ids[2]),
    )
    for i in range(n):
        negs = [float(img[i] @ txt[j]) for j in range(n) if j != i]
        negs += [float(img[i] @ c) for c in want.double()]
        xs = sorted(negs, reverse=True)
        r = alpha * (len(xs) + 1) - 1
        lo = math.floor(r)
        assert float(est[i]) == pytest.approx(xs[lo] + (r - lo) * (xs[lo + 1] - xs[lo]), abs=1e-5)
    # a queued column of the anchor's own sample is no negative
    det.queue_ids["img"][0] = 3
    own = det._estimate(
        "img",
        (img @ txt.T).float(),
        ~torch.eye(n, dtype=torch.bool),
        1,
        _feature_input(index, img, txt, ids[2]),
    )
    assert float(own[3]) != float(est[3]) and torch.equal(own[:3], est[:3])


def test_a_queue_is_saved_and_loaded_whole_or_refused(tmp_path):
    from clipfnd.errors import CheckpointError
    from clipfnd.state.files import load_detector_state, save_detector_state

    n = 12
    det = _glofnd(n, alpha=0.1, optimizer="quantile", queue=20, offset=False)
    img, txt = _unit(n, 5, 0), _unit(n, 5, 1)
    det.detect(_feature_input(torch.arange(n), img, txt, torch.arange(n)))
    det.after_step({}, masked=False)
    save_detector_state(det, tmp_path)
    again = _glofnd(n, alpha=0.1, optimizer="quantile", queue=20, offset=False)
    load_detector_state(again, tmp_path, det.steps)
    assert torch.equal(again.queue["txt"], det.queue["txt"])
    assert torch.equal(again.queue_ids["img"], det.queue_ids["img"])
    import safetensors.torch

    for bad, message in (
        (
            {"queue_img": torch.full((3, 5), float("nan")), "queue_ids_img": torch.arange(3)},
            "not finite",
        ),
        ({"queue_img": torch.zeros(30, 5), "queue_ids_img": torch.arange(30)}, "at most 20"),
        ({"queue_img": torch.zeros(3, 5), "queue_ids_img": torch.arange(2)}, "one dataset index"),
        ({"queue_img": torch.zeros(3, 5)}, "come together"),
        ({"thresholds": torch.zeros(3)}, "unknown tensors"),
    ):
        safetensors.torch.save_file(bad, str(tmp_path / "detector.safetensors"))
        fresh = _glofnd(n, alpha=0.1, optimizer="quantile", queue=20, offset=False)
        with pytest.raises(CheckpointError, match=message):
            load_detector_state(fresh, tmp_path, det.steps)
        assert fresh.queue == {"img": None, "txt": None}  # nothing taken
    (tmp_path / "detector.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(CheckpointError, match="detector.safetensors is not a detector state"):
        load_detector_state(_glofnd(n, alpha=0.1, queue=20), tmp_path, det.steps)
