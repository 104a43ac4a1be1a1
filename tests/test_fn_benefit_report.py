"""benchmarks/fn_benefit.py's arithmetic and report, on hand-written run results (the training
runs themselves are what ``python benchmarks/fn_benefit.py --quick`` exercises)."""

from __future__ import annotations

import argparse
import math

import pytest
from benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def fb():
    return load_benchmark("fn_benefit")


def run(concept: float, precision=None) -> dict:
    r = {k: concept for k in ("label_i2t_R@1", "label_t2i_R@1", "zeroshot/top1")}
    r.update({k: 0.01 for k in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5")})
    r.update({"label_i2t_R@5": 0.9, "label_t2i_R@5": 0.9, "concept_mean": concept})
    r["precision"], r["recall"] = precision, (None if precision is None else 0.5)
    r["detection"] = [] if precision is None else [[8, precision, 0.4], [12, precision, 0.6]]
    return r


def results(fb) -> dict:
    main = {
        fb.BASELINE: [run(0.60), run(0.70)],
        fb.GLO: [run(0.70, 0.4), run(0.72, 0.5)],
        "FastCLIP-v1": [run(0.55), run(0.75)],
        fb.ORACLE: [run(0.80, 1.0), run(0.80, 1.0)],
    }
    sweep = {m: main[m] for m in fb.SWEEP_METHODS}
    return {
        "config": {"seeds": [0, 1], "epochs": 8, "quick": False, "digits_epochs": 10},
        "testbed": {"concepts": 16, "train": 4096, "val": 1024, "same_label_rate": 0.0625},
        "main": main,
        "alpha_sweep": {"0.031250": [run(0.65, 0.6), run(0.71, 0.7)], "0.062500": main[fb.GLO]},
        "concept_sweep": {"8": sweep, "16": sweep},
        "concept_rates": {"8": 0.125, "16": 0.0625},
        "digits": sweep,
        "digits_rate": 0.1,
        "minutes": 70.0,
        "date": "2026-11-23",
        "machine": "x86_64 CPU, 2 threads",
    }


def test_gap_closed_is_paired_by_seed(fb):
    r = results(fb)
    assert fb.gap_closed(r["main"], fb.GLO) == pytest.approx([0.5, 0.2])
    assert fb.gap_closed(r["main"], "FastCLIP-v1") == pytest.approx([-0.25, 0.5])
    tied = {fb.BASELINE: [run(0.8)], fb.ORACLE: [run(0.8)], "x": [run(0.9)]}
    assert math.isnan(fb.gap_closed(tied, "x")[0])  # no gap to close: not a number, not a ratio
    assert fb.fmt([0.5, float("nan"), 0.7]) == "0.600 ± 0.141 (2 of 3 seeds)"
    assert fb.fmt([float("nan")]) == "no gap" and fb.fmt([None, None]) == "-"


def test_same_label_rate_counts_pairs_of_distinct_samples(fb):
    assert fb.same_label_rate([0, 0, 1, 1]) == pytest.approx(2 * 2 / 12)
    assert fb.same_label_rate([0, 1, 2, 3]) == 0.0


def test_report_writes_tables_plots_and_keeps_the_rest_of_the_file(fb, tmp_path):
    out = tmp_path / "results.md"
    before = "# vision tables\n\n<!-- notes -->\nmy notes\n\n## Speed against open_clip's trainer\n\nspeed\n"
    out.write_text(before)
    a = argparse.Namespace(json_name="fn_benefit.json")
    images = tmp_path / "images"
    images.mkdir()
    for _ in range(2):  # a second report replaces the section instead of adding another
        fb.report(results(fb), a, out, images)
    text = out.read_text()
    assert text.count(fb.BEGIN) == 1 and text.count(fb.END) == 1
    assert text.startswith("# vision tables\n\n<!-- notes -->\nmy notes\n\n" + fb.BEGIN)
    assert text.endswith("## Speed against open_clip's trainer\n\nspeed\n")
    assert "share of that gap CLIP + GloFND closes is 0.350 ± 0.212**" in text
    assert "The oracle beats CLIP by 15.0 ± 7.1 points" in text
    assert (
        "| CLIP + GloFND (eliminate) | 0.710 ± 0.014 | 0.710 ± 0.014 | 0.710 ± 0.014 | 0.350 ± 0.212 | 0.450 ± 0.071 | 0.500 ± 0.000 |"
        in text
    )
    assert "| 0.0312 | 0.680 ± 0.042 |" in text  # the alpha sweep, sorted by alpha
    assert "| 8 | 32 | CLIP |" in text  # 255 * 0.125 false negatives per anchor
    assert "same-class i2t R@1" in text
    for name in ("detection", "alpha", "concepts"):
        png = images / f"fn_benefit_{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert f"images/fn_benefit_{name}.png" in text
