"""The GloFND study of benchmarks/vision_results.py (``--study glofnd``): its arithmetic and
page on hand-written run results; the hand-written notes survive a redraw. The training runs
themselves are what ``--study glofnd --quick`` exercises."""

from __future__ import annotations

import argparse

import pytest
from benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def vr():
    return load_benchmark("vision_results")


def run(knn: float, cal: float | None = None) -> dict:
    return {
        "knn": knn,
        "linear_probe": knn + 0.1,
        "calibration": cal,
        "precision": None if cal is None else 0.12,
        "recall": None if cal is None else 0.12,
        "mask_start_step": None if cal is None else 100,
        "total_steps": 300,
        "series": []
        if cal is None
        else [{"step": 150, "flagged_over_alpha": cal, "precision": 0.1}],
        "seconds": 60.0,
    }


def results() -> dict:
    testbed = {  # seeds as keys, as the JSON holds them; seed 2 of the oracle is missing
        "SimCLR": {"0": run(0.50), "1": run(0.52), "2": run(0.49)},
        "SimCLR + GloFND": {"0": run(0.35, 1.0), "1": run(0.57, 1.8), "2": run(0.40, 1.0)},
        "SimCLR + oracle": {"0": run(0.56), "1": run(0.57)},
    }
    return {
        "config": {"seeds": [0, 1, 2], "epochs": 40, "mask_start": 33},
        "data": {"testbed": {"rate": 0.0625, "classes": 16, "train": 2048, "what": "the testbed"}},
        "runs": {"testbed": testbed},
        "seconds": 600.0,
        "commands": ["python benchmarks/vision_results.py --study glofnd"],
        "machine": "x86_64",
        "date": "2026-12-05",
        "json": "docs/vision_glofnd.json",
    }


def test_gap_closed_pairs_seeds_and_leaves_out_a_seed_an_arm_lacks(vr):
    by_arm = results()["runs"]["testbed"]
    # seed 0: (0.35 - 0.50) / (0.56 - 0.50); seed 1: (0.57 - 0.52) / (0.57 - 0.52); no seed 2
    assert vr.gap_closed(by_arm, "SimCLR + GloFND") == pytest.approx([-2.5, 1.0])
    assert vr.paired(by_arm["SimCLR"], by_arm["SimCLR + oracle"]) == pytest.approx([0.06, 0.05])


def test_an_arm_counts_only_when_its_mean_calibration_is_within_the_band(vr):
    by_arm = results()["runs"]["testbed"]
    assert "1.267 ± 0.462 ✓" in vr.study_cells(by_arm, "SimCLR + GloFND")
    by_arm["SimCLR + GloFND"]["0"]["calibration"] = 2.0
    assert "✗" in vr.study_cells(by_arm, "SimCLR + GloFND")


def test_the_oracle_is_judged_against_the_seed_spread(vr):
    line = vr.oracle_line("testbed", results()["runs"]["testbed"])
    assert "SimCLR + oracle - SimCLR: +5.5 ± 0.7 kNN points paired by seed" in line
    assert "more than the larger seed spread of the two (1.5)" in line


def test_a_redraw_keeps_the_hand_written_notes_and_the_rest_of_the_page(vr, tmp_path):
    out = tmp_path / "results.md"
    out.write_text(
        "# Results\n\n## Vision-only methods\n\ntables\n\n<!-- fn_benefit:begin -->\nx\n"
    )
    a = argparse.Namespace(out=str(out), json=str(tmp_path / "v.json"))
    vr.report_study(results(), a)
    text = out.read_text()
    assert text.index("tables") < text.index(vr.STUDY_BEGIN) < text.index("<!-- fn_benefit")
    notes = "\nOur reading, by hand.\n"
    text = text.replace(vr.STUDY_NOTES + "\n", vr.STUDY_NOTES + notes)
    out.write_text(text)
    vr.report_study(results(), a)  # redrawn: one section, the notes kept
    text = out.read_text()
    assert text.count(vr.STUDY_BEGIN) == text.count(vr.STUDY_END) == 1
    assert notes in text and "| SimCLR + GloFND |" in text
    for name in ("knn", "calibration"):
        assert (tmp_path / "images" / f"vision_glofnd_{name}.png").stat().st_size > 1000
