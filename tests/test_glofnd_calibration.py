"""GloFND's calibration options against slow float64 computations (docs/methods.md,
"Calibration"): the histogram quantile, a threshold's start from its row's quantile or the
shared quantile, the offset re-estimated every step, where masking starts, and the warning."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from clipfnd.config import FNDConfig, MaskStart
from clipfnd.fnd import GloFND
from clipfnd.fnd.base import DetectionInput
from clipfnd.fnd.calibration import HIST_BINS, histogram, upper_quantile
from clipfnd.state import StateTables

WIDTH = 4.0 / HIST_BINS  # one bin


def tolerance(values: list[float], share: float) -> float:
    """How far the histogram's quantile may lie from the exact one: a bin, plus the gap
    between the order statistics around it (where the data is sparse, two interpolations
    between different points differ by up to that)."""
    xs = sorted(values)
    h = round((len(xs) - 1) * (1 - share))
    return WIDTH + xs[min(h + 1, len(xs) - 1)] - xs[max(h - 1, 0)]


def exact_upper_quantile(values: list[float], share: float) -> float:
    """The value above which ``share`` of ``values`` lies: the (1 - share) quantile with
    linear interpolation between order statistics, in float64, by hand."""
    xs = sorted(values)
    h = (len(xs) - 1) * (1 - share)
    lo = math.floor(h)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (h - lo) * (xs[hi] - xs[lo])


def exact_visit_quantile(values: list[float], alpha: float) -> float:
    """A visit's estimate of the (1 - alpha) quantile, by hand: the alpha (n + 1)-th largest of
    the n values, interpolated linearly between order statistics (float64)."""
    xs = sorted(values, reverse=True)
    r = alpha * (len(xs) + 1) - 1
    lo = math.floor(r)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (r - lo) * (xs[hi] - xs[lo])


@pytest.mark.parametrize("share", [0.001, 0.02, 0.06, 0.3])
def test_histogram_quantile_is_within_a_bin_of_the_exact_one(share):
    g = torch.Generator().manual_seed(0)
    values = (torch.rand(20000, generator=g, dtype=torch.float64) * 2 - 1) ** 3  # skewed
    keep = torch.rand(20000, generator=g) > 0.1
    got = upper_quantile(histogram(values, keep), share)
    want = exact_upper_quantile(values[keep].tolist(), share)
    assert abs(got - want) <= tolerance(values[keep].tolist(), share), (got, want)
    # the share of values above it is the share asked for, to within one value per bin edge
    above = float((values[keep] > got).double().mean())
    assert abs(above - share) <= 1.5 / keep.sum().item() + 1e-3
    assert upper_quantile(torch.zeros(HIST_BINS, dtype=torch.long), share) is None


@pytest.mark.parametrize(
    "spec,kind,value",
    [(0, "epoch", 0), (3, "epoch", 3), ("2", "epoch", 2), (0.3, "fraction", 0.3)]
    + [("30%", "fraction", 0.3), ("auto", "auto", 0.0), ("AUTO", "auto", 0.0)],
)
def test_mask_start_forms(spec, kind, value):
    got = MaskStart.parse(spec)
    assert (got.kind, got.value) == (kind, pytest.approx(value))


@pytest.mark.parametrize("spec", [-1, 1.0, 1.5, "100%", "soon", True, float("nan")])
def test_mask_start_refuses_other_values_naming_the_forms(spec):
    with pytest.raises(ValueError, match="fnd.start_mask"):
        MaskStart.parse(spec)


def _glofnd(tables, types, **kw) -> GloFND:
    """A detector with the options ``kw`` names and the paper's rule for the others (each
    option is tested on its own)."""
    kw = {"init": "constant", "offset": False, "optimizer": "adam", **kw}
    cfg = FNDConfig(alpha=kw.pop("alpha", 0.1), lr=kw.pop("lr", 0.05), **kw)
    return GloFND.from_config(cfg, tables, types)


def _unit(n, d, seed):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=1)


def _bimodal_input(index, img, txt, epoch=0, **kw):
    """A CLIP step's detection input: anchors ``index`` (rows of img/txt) against every column."""
    sims = {"img": (img[index] @ txt.T).float(), "txt": (txt[index] @ img.T).float()}
    return DetectionInput(sims, index, index, None, None, txt.shape[0] - 1, epoch, **kw)


def test_quantile_start_is_each_rows_quantile_and_the_next_visit_an_adam_step():
    """init=quantile: a sample's first visit sets its threshold to its visit's estimate of
    the (1 - alpha) quantile of its negatives in that batch (the value of expected exceedance
    alpha; no Adam step: m = v = 0), and flags by it; its next visit is the Adam rule with its
    first bias correction (t = 1)."""
    n, alpha, lr = 24, 0.1, 0.05
    img, txt = _unit(n, 5, 0), _unit(n, 5, 1)
    tables = StateTables(n)
    det = _glofnd(tables, ("img", "txt"), alpha=alpha, lr=lr, init="quantile")
    index = torch.arange(n)
    found = det.detect(_bimodal_input(index, img, txt))
    for t, (a, b) in {"img": (img, txt), "txt": (txt, img)}.items():
        s = (a @ b.T).float().double()
        want = [
            exact_visit_quantile([float(s[i, j]) for j in range(n) if j != i], alpha)
            for i in range(n)
        ]
        got = found.rows[f"glofnd.lambda_{t}"]
        torch.testing.assert_close(
            got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6, rtol=0
        )
        assert torch.equal(found.rows[f"glofnd.m_{t}"], torch.zeros(n))
        assert torch.equal(found.rows[f"glofnd.count_{t}"], torch.ones(n))
        flags = s > torch.tensor(want)[:, None]
        flags.fill_diagonal_(False)
        assert torch.equal(det.flags(s.float(), got, [index]), flags)
    tables.write_rows(index, found.rows)

    img2, txt2 = _unit(n, 5, 2), _unit(n, 5, 3)  # the next visit, other similarities
    second = det.detect(_bimodal_input(index, img2, txt2, epoch=1))
    for t, (a, b) in {"img": (img2, txt2), "txt": (txt2, img2)}.items():
        s = (a @ b.T).double()
        lam = tables[f"glofnd.lambda_{t}"].double()
        for i in range(n):
            above = sum(float(s[i, j]) > float(lam[i]) for j in range(n) if j != i)
            g = alpha - above / (n - 1)
            m, v = 0.1 * g, 0.02 * g * g  # beta1 0.9, beta2 0.98, from zero moments
            mhat, vhat = m / (1 - 0.9), v / (1 - 0.98)  # t = 1
            want = max(-1.0, min(1.0, float(lam[i]) - lr * mhat / (math.sqrt(vhat) + 1e-8)))
            got = float(second.rows[f"glofnd.lambda_{t}"][i])
            assert abs(got - want) <= 1e-6, (t, i, got, want)


def test_the_unimodal_quantile_start_is_the_mean_of_both_views_rows():
    n, alpha = 12, 0.2
    z = _unit(2 * n, 4, 5)
    tables = StateTables(n)
    det = _glofnd(tables, ("view",), alpha=alpha, init="quantile")
    index = torch.arange(n)
    pos = torch.cat([torch.arange(n) + n, torch.arange(n)])
    own = torch.zeros(2 * n, 2 * n, dtype=torch.bool)
    own[torch.arange(2 * n), torch.arange(2 * n)] = True
    sims = {"view": (z @ z.T).float()}
    found = det.detect(DetectionInput(sims, pos, index, None, own, 2 * n - 2, 0, 2))
    s = sims["view"].double()
    for i in range(n):
        rows = []
        for r in (i, i + n):
            negs = [float(s[r, j]) for j in range(2 * n) if j not in (i, i + n)]
            rows.append(exact_visit_quantile(negs, alpha))
        got = float(found.rows["glofnd.lambda_view"][i])
        assert abs(got - sum(rows) / 2) <= 1e-6


def test_the_offset_is_the_batch_quantile_of_similarity_less_threshold():
    """offset=true: theta_n = lambda_n + delta, delta the (1 - alpha) quantile of s_nj -
    lambda_n over the batch's negatives (to one histogram bin), so about alpha of them are
    flagged whatever the thresholds; the next step starts from it (state)."""
    n, alpha = 64, 0.06
    img, txt = _unit(n, 6, 7), _unit(n, 6, 8)
    tables = StateTables(n)
    det = _glofnd(tables, ("img", "txt"), alpha=alpha, offset=True)
    lam = torch.linspace(-0.3, 0.9, n)  # thresholds far from calibrated
    for t in ("img", "txt"):
        tables[f"glofnd.lambda_{t}"].copy_(lam)
        tables[f"glofnd.count_{t}"].fill_(3)
    index = torch.arange(n)
    found = det.detect(_bimodal_input(index, img, txt))
    det.after_step(found.stats, masked=False)
    for t, (a, b) in {"img": (img, txt), "txt": (txt, img)}.items():
        s = (a @ b.T).float().double()
        residuals = [float(s[i, j] - lam[i]) for i in range(n) for j in range(n) if i != j]
        want = exact_upper_quantile(residuals, alpha)
        assert abs(det.offsets[t] - want) <= tolerance(residuals, alpha), (t, det.offsets[t], want)
        flagged, negatives = found.stats[f"glofnd.flagged_{t}"].tolist()
        assert negatives == n * (n - 1)
        assert abs(flagged / negatives - alpha) <= 2 / negatives + 1e-3
    assert det.state_dict()["offsets"] == det.offsets


def test_the_shared_start_is_the_quantile_of_every_negative_in_the_batch():
    n, alpha = 40, 0.1
    img, txt = _unit(n, 6, 9), _unit(n, 6, 10)
    tables = StateTables(n)
    det = _glofnd(tables, ("img", "txt"), alpha=alpha, init="shared")
    index = torch.arange(n)
    found = det.detect(_bimodal_input(index, img, txt))
    s = (img @ txt.T).float().double()
    negatives = [float(s[i, j]) for i in range(n) for j in range(n) if i != j]
    want = exact_upper_quantile(negatives, alpha)
    got = found.rows["glofnd.lambda_img"]
    assert torch.all((got.double() - want).abs() <= tolerance(negatives, alpha))
    assert torch.equal(found.rows["glofnd.count_img"], torch.ones(n))


def test_masking_from_a_share_of_training_and_after_calibrated_steps():
    tables = StateTables(8)
    det = _glofnd(tables, ("img",), start_mask="25%")
    det.plan(total_steps=8, steps_per_epoch=4)
    masks = []
    for _ in range(8):
        masks.append(det.masking(epoch=0))
        det.after_step({}, masked=masks[-1])
    assert masks == [False, False, True, True, True, True, True, True]  # from step 3 of 8
    assert det.masked_from == 3

    det = _glofnd(StateTables(8), ("img",), alpha=0.1, start_mask="auto", start_mask_window=3)
    det.plan(total_steps=100, steps_per_epoch=10)

    def step(ratio, spread=0.2):  # a large batch: counting noise far below the band
        masked = det.masking(epoch=0)
        counts = torch.tensor([1e6 * ratio * 0.1, 1e6], dtype=torch.float64)
        # 100 anchors of 10 expected flags each, their own counts spread by `spread` x 10
        e = torch.full((100,), 10.0)
        dev = (spread * e) ** 2
        sums = torch.stack([dev.sum(), (e * 0.9).sum() * 0, (e * e).sum()]).double()
        det.after_step({"glofnd.flagged_img": counts, "glofnd.spread_img": sums}, masked)
        return masked

    # 2 calibrated, one at 1.5 x alpha (outside 0.75-1.33), then 3 calibrated: masking next
    assert [step(r) for r in (1.0, 0.9, 1.5, 1.2, 0.8, 1.0)] == [False] * 6
    assert step(2.0) and det.masked_from == 7  # once started, it stays on
    assert step(0.1)

    # calibrated over the batch at every step, but the anchors' own shares spread by 1.5 x
    # alpha (one threshold for anchors that differ): never ready, until they settle
    det = _glofnd(StateTables(8), ("img",), alpha=0.1, start_mask="auto", start_mask_window=3)
    det.plan(total_steps=100, steps_per_epoch=10)
    assert not any(step(1.0, spread=1.5) for _ in range(20))
    settled = [step(1.0, spread=0.2) for _ in range(12)]
    assert not settled[0] and any(settled)  # the weighted spread falls below the bar


def test_a_small_batch_is_judged_by_its_counting_noise():
    from clipfnd.fnd.calibration import calibrated_count

    assert calibrated_count(1.2e4, 1e5, 0.1) and not calibrated_count(1.5e4, 1e5, 0.1)
    assert not calibrated_count(0.7e4, 1e5, 0.1)
    # 8 flags expected (alpha 1e-3, 8064 negatives): 3 or 14 is noise, 30 is not
    assert calibrated_count(3, 8064, 1e-3) and calibrated_count(14, 8064, 1e-3)
    assert not calibrated_count(30, 8064, 1e-3) and not calibrated_count(0, 0, 1e-3)


def test_a_run_far_from_calibration_is_warned_once_with_the_key_to_change():
    det = _glofnd(StateTables(4), ("img",), alpha=0.1)
    det.after_step({"glofnd.flagged_img": torch.tensor([25.0, 100.0])}, masked=True)  # 2.5 x
    msg = det.epoch_report()
    assert "2.50 x fnd.alpha=0.1" in msg and "fnd.offset=true" in msg
    det.after_step({"glofnd.flagged_img": torch.tensor([25.0, 100.0])}, masked=True)
    assert det.epoch_report() is None  # once a run
    det = _glofnd(StateTables(4), ("img",), alpha=0.1)
    det.after_step({"glofnd.flagged_img": torch.tensor([2.0, 100.0])}, masked=True)  # 0.2 x
    assert "fnd.init=quantile" in det.epoch_report()
    det = _glofnd(StateTables(4), ("img",), alpha=0.1)
    det.after_step({"glofnd.flagged_img": torch.tensor([12.0, 100.0])}, masked=True)
    assert det.epoch_report() is None  # 1.2 x: within [0.5, 2]
    det = _glofnd(StateTables(4), ("img",), alpha=0.1)
    det.after_step({"glofnd.flagged_img": torch.tensor([4.97, 100.0])}, masked=True)
    assert "flagged 0.497 x" in det.epoch_report()  # not "0.50", which reads as within


def test_the_run_wide_state_round_trips_and_refuses_garbage():
    det = _glofnd(StateTables(4), ("img", "txt"), offset=True, start_mask="auto")
    det.offsets["img"], det.streak, det.steps, det.masked_from = 0.25, 3, 9, 7
    again = _glofnd(StateTables(4), ("img", "txt"), offset=True, start_mask="auto")
    again.load_state_dict(det.state_dict())
    assert again.state_dict() == det.state_dict()
    for bad in (
        {"steps": -1},
        {"steps": 1, "offsets": {"img": "x"}},
        {"steps": 1, "masked_from": 1.5},
    ):
        with pytest.raises(ValueError, match="detector state"):
            again.load_state_dict(bad)


# --- real runs -----------------------------------------------------------------------------
def _train(data, run, *extra):
    import json

    from clipfnd.config import load_config
    from clipfnd.train.loop import train

    cfg = load_config(
        None,
        [
            f"output_dir={run}",
            f"data.train={data}",
            "data.num_workers=0",
            "train.log_every=1",
            "train.progress=false",
            "train.report_to=none",
            "train.checkpoint_every=0",
            "eval.at_end=false",
            "fnd.detector=glofnd",
            *extra,
        ],
    )
    summary = train(cfg)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return summary, lines


@pytest.mark.slow
def test_an_automatic_start_in_a_real_run_is_logged_plotted_and_summarised(shapes, tmp_path):
    """start_mask=auto with a window of 4 steps. A run whose similarities hardly move between
    visits (optim.lr 1e-5) is ready in its second epoch: the offset keeps the flagged share at
    alpha and the anchors' own shares spread less than 1 (``fnd/anchor_spread``), so masking
    starts there; its line, the summary and the calibration plot say so, and no calibration
    warning is given. The same run at the default optim.lr, whose similarities move far
    between a sample's visits, is calibrated over the batch at every step of its second epoch
    but its anchors' own shares spread above 1: it does not start."""
    import json

    run = tmp_path / "run"
    common = (
        "data.batch_size=64",
        "train.epochs=2",
        "fnd.alpha=0.06",
        "fnd.start_mask=auto",
        "fnd.start_mask_window=4",
    )
    summary, lines = _train(shapes / "train", run, *common, "optim.lr=1e-5")
    (start,) = [r for r in lines if "fnd/mask_start_step" in r]
    first = int(start["fnd/mask_start_step"])
    assert start["step"] == first == summary["fnd_mask_start_step"] and 10 <= first <= 16
    steps = [r for r in lines if "loss" in r]
    assert [r["fnd/masking"] for r in steps] == [0.0] * (first - 1) + [1.0] * (17 - first)
    assert steps[first - 2]["fnd/anchor_spread"] <= 1.0  # the step before it started
    assert all(0.9 <= r["fnd/flagged_over_alpha"] <= 1.1 for r in steps[8:])
    assert all("fnd/threshold_gap_img" in r and "fnd/offset_txt" in r for r in steps)
    assert not any("fnd/precision" in r for r in steps[: first - 1])  # nothing removed
    index = json.loads((run / "plots" / "index.json").read_text())
    assert index["calibration.png"] == [
        "flagged / fnd.alpha (shaded: calibrated)",
        "threshold - batch quantile",
        "anchors within 0.5-2 x alpha of their own negatives",
    ]
    log_text = (run / "train.log").read_text()
    assert "GloFND flagged" not in log_text
    # per anchor, at each epoch's end: 256 fixed anchors of the 512 against all of them
    ends = [r for r in lines if "fnd/anchors_img_within" in r]
    assert [r["step"] for r in ends] == [8, 16]
    assert all(r["fnd/anchors_txt_measured"] == 256 for r in ends)
    assert all(0 <= r["fnd/anchors_img_within_global"] <= 1 for r in ends)

    summary, lines = _train(shapes / "train", tmp_path / "moving", *common)
    steps = [r for r in lines if "loss" in r]
    assert not any("fnd/mask_start_step" in r for r in lines)
    assert summary.get("fnd_mask_start_step") is None
    assert all(0.9 <= r["fnd/flagged_over_alpha"] <= 1.1 for r in steps[8:])
    assert all(r["fnd/anchor_spread"] > 1.0 for r in steps[9:]), [
        r["fnd/anchor_spread"] for r in steps
    ]


@pytest.mark.slow
def test_the_defaults_stay_calibrated_on_the_fn_testbed(tmp_path):
    """The issue's check: a fresh seed of the fn-testbed (1024 pairs, batch 128, 4 epochs),
    only fnd.detector and fnd.alpha set. The flagged share never exceeds 1.5 x alpha at a
    logged step, and over the last quarter its median lies within 0.75-1.33 x alpha (the
    paper's rule gave 2.9 x and 2.5 x over 16 epochs here). With the offset on this holds
    almost by construction; what is per anchor is tests/test_glofnd_per_anchor.py's and the
    auto start's test above."""
    import statistics

    from data_pipelines import synthetic
    from data_pipelines.shards import write_split

    spec = synthetic.preset_spec("fn-testbed", seed=11)
    write_split(
        tmp_path / "train",
        synthetic.generate(spec, 1024, "train"),
        shard_size=256,
        label_names=synthetic.label_names(spec),
        progress=False,
    )
    _, lines = _train(
        tmp_path / "train",
        tmp_path / "run",
        "data.batch_size=128",
        "train.epochs=4",
        "fnd.alpha=0.06",
        "seed=11",
        "train.plots=false",
        "train.report_to=none",
    )
    ratios = [r["fnd/flagged_over_alpha"] for r in lines if "fnd/flagged_over_alpha" in r]
    assert len(ratios) == 32
    assert max(ratios) <= 1.5, max(ratios)
    assert 0.75 <= statistics.median(ratios[24:]) <= 4 / 3


@pytest.mark.parametrize("alpha", [0.004, 0.05, 0.3])
def test_visit_quantile_reads_only_the_order_statistics_it_needs(alpha):
    """The estimate takes a top-k as deep as the deepest row needs (not a sort): rows with very
    different numbers of negatives, ties among them, and a row with no order statistic that
    high (NaN), each equal to the by-hand float64 estimate."""
    from clipfnd.fnd.glofnd import visit_quantile

    g = torch.Generator().manual_seed(3)
    b, m = 12, 300
    sims = (torch.rand(b, m, generator=g) * 2 - 1).round(decimals=2)  # ties
    keep = torch.rand(b, m, generator=g) < torch.linspace(0.02, 1.0, b)[:, None]
    keep[0] = False
    keep[0, :2] = True  # two negatives: alpha (n + 1) < 1 for the smaller alphas
    got = visit_quantile(sims, keep, alpha, 1)
    for i in range(b):
        negs = [float(v) for v in sims[i][keep[i]].double()]
        if alpha * (len(negs) + 1) < 1:
            assert math.isnan(got[i])
        else:
            assert float(got[i]) == pytest.approx(exact_visit_quantile(negs, alpha), abs=1e-12)
