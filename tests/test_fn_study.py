"""benchmarks/fn_study.py's arithmetic: the flags' precision, recall and the three label-free
signals on a hand-worked 4-sample split, the paired gains, the signals' rank correlation and the
page (the training runs themselves are what ``python benchmarks/fn_study.py --quick`` runs)."""

from __future__ import annotations

import json

import pytest
import torch
from benchmark_module import load_benchmark

# s[i, j]: image i against text j. Labels 0, 0, 1, 1: the same-concept negatives are
# (0,1), (1,0), (2,3), (3,2) on each side.
S = torch.tensor(
    [
        [1.0, 0.9, 0.1, 0.8],
        [0.9, 1.0, 0.2, 0.1],
        [0.1, 0.2, 1.0, 0.9],
        [0.3, 0.1, 0.9, 1.0],
    ],
    dtype=torch.float64,
)


@pytest.fixture(scope="module")
def fs():
    return load_benchmark("fn_study")


def split(img_thr: float, txt_thr: float) -> dict:
    # image features the identity, text features S's columns: image i . text j = S[i, j]
    return {
        "img": torch.eye(4, dtype=torch.float64),
        "txt": S.T.clone(),
        "thr": {"img": torch.full((4,), img_thr), "txt": torch.full((4,), txt_thr)},
        "labels": torch.tensor([0, 0, 1, 1]),
    }


def test_flags_and_the_label_free_signals_match_the_hand_count(fs):
    final = split(0.5, 0.5)
    flags = fs.flag_sets(final)
    # image anchors: (0,1) (0,3) (1,0) (2,3) (3,2); text anchors: (0,1) (1,0) (2,3) (3,0) (3,2)
    assert flags["img"].nonzero().tolist() == [[0, 1], [0, 3], [1, 0], [2, 3], [3, 2]]
    assert flags["txt"].nonzero().tolist() == [[0, 1], [1, 0], [2, 3], [3, 0], [3, 2]]
    # early: no image anchor flags (0.95 is above every negative); text anchors at 0.85 flag the
    # four same-concept pairs
    d = fs.detection(final, flags, split(0.95, 0.85), alpha=0.25)
    assert d["precision"] == pytest.approx(8 / 10)
    assert d["recall"] == pytest.approx(8 / 8)
    assert d["flagged_share"] == pytest.approx(10 / 24)
    assert d["agreement"] == pytest.approx(4 / 6)  # both sides: the 4 same pairs; either: 6
    assert d["mutual"] == pytest.approx(8 / 10)  # (0,3) and (3,0) have no reverse on their side
    assert d["persistence"] == pytest.approx(4 / 10)
    # one threshold for all: the learned thresholds and the global one flag alike
    for t in ("img", "txt"):
        m = d[f"per_anchor_{t}"]
        assert m["within"] == pytest.approx(m["within_global"])
    none = fs.detection(final, fs.flag_sets(split(2.0, 2.0)), None, alpha=0.25)
    assert none["precision"] is None and none["agreement"] is None and none["recall"] == 0.0


def run(fs, rule: str, frac: float, seed: int, concept: float, precision=None, **signals):
    r = {"rule": rule, "frac": frac, "alpha": 0.06 * frac, "seed": seed, "seconds": 1.0}
    r.update({k: concept for k in fs.CONCEPT_KEYS}, concept_mean=concept)
    r.update(precision=precision, recall=0.5, train_precision=precision, **signals)
    if precision is not None:
        for t in ("img", "txt"):
            r[f"per_anchor_{t}"] = {"within": 0.8, "within_global": 0.6}
    return r


def test_gains_pair_by_seed_and_the_signals_rank_against_precision(fs, tmp_path):
    runs = [run(fs, "none", 1.0, s, 0.6 + 0.1 * s) for s in range(3)]
    runs += [run(fs, "oracle", 1.0, s, 0.7 + 0.1 * s) for s in range(3)]
    for k, frac in enumerate(fs.FRACTIONS):
        for s in range(3):
            p = 0.9 - 0.2 * k - 0.01 * s
            # agreement follows precision; mutual runs against it; persistence is missing
            runs.append(run(fs, "default", frac, s, 0.62 + 0.1 * s, p, agreement=p, mutual=-p))
    assert fs.paired(runs, "default", 1.0) == pytest.approx([2.0, 2.0, 2.0])
    assert fs.paired(runs, "oracle", 1.0) == pytest.approx([10.0, 10.0, 10.0])
    table = {
        sig: (overall, within, n)
        for sig, overall, within, n in fs.signal_table({"t": {"rate": 0.06, "runs": runs}})
    }
    assert table["agreement"][0] == pytest.approx(1.0) and table["agreement"][2] == 12
    assert table["mutual"][0] == pytest.approx(-1.0)
    assert all(w == pytest.approx(1.0) for w in table["agreement"][1])
    assert table["persistence"][2] == 0

    out = tmp_path / "runs" / "fn-testbed"
    out.mkdir(parents=True)
    (out / "testbed.json").write_text(json.dumps({"rate": 0.06}))
    for r in runs:
        (out / f"{r['rule']}-{r['frac']:g}-{r['seed']}.json").write_text(json.dumps(r))
    study = fs.load_runs(tmp_path)
    assert len(study["fn-testbed"]["runs"]) == len(runs)
    meta = {
        "command": "c",
        "date": "d",
        "machine": "m",
        "minutes": 1.0,
        "num_train": 1024,
        "batch": 128,
        "epochs": 40,
        "seeds": [0, 1, 2],
    }
    page = fs.render(study, meta)
    assert page.startswith(fs.BEGIN) and page.endswith(fs.END)
    assert "| default | rate/8 (0.0075) | 2.0 ± 0.0 | 0.890 ± 0.010 |" in page
    assert "| persistence | 0 | - | - |" in page
    assert "| agreement | 12 | +1.00 |" in page
