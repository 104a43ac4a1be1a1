"""benchmarks/fn_regime.py's arithmetic and page, on hand-written run results (the training
runs themselves are what ``python benchmarks/fn_regime.py --quick`` exercises)."""

from __future__ import annotations

import json

import pytest
from benchmark_module import load_benchmark


@pytest.fixture(scope="module")
def fr():
    return load_benchmark("fn_regime")


def run(seed: int, concept: float, cal: float | None = None) -> dict:
    r = {k: concept for k in ("label_i2t_R@1", "label_t2i_R@1", "zeroshot/top1")}
    r.update(seed=seed, concept_mean=concept, calibration=cal, steps=240, mask_start_step=73)
    r["precision"] = r["recall"] = None if cal is None else 0.5
    r["curve"] = [] if cal is None else [[4, 1.0], [8, cal]]
    return r


def results(fr) -> dict:
    # CLIP, GloFND and the oracle have seeds 0-2; FastCLIP-v3 only 0-1, listed out of order
    main = {
        fr.BASELINE: [run(0, 0.60), run(1, 0.70), run(2, 0.65)],
        fr.GLO: [run(0, 0.70, 1.0), run(1, 0.72, 1.6), run(2, 0.65, 0.9)],
        "FastCLIP-v3": [run(1, 0.75), run(0, 0.55)],
        fr.ORACLE: [run(0, 0.80), run(1, 0.80), run(2, 0.65)],
    }
    return {
        "config": {"seeds": [0, 1], "more_seeds": [2], "epochs": 30, "train": 2048, "val": 1024},
        "command": "python benchmarks/fn_regime.py --resume",
        "testbed": {"rate": 0.0625},
        "main": main,
        "starts": {"30%": main[fr.GLO], "70%": [run(0, 0.62, 1.0), run(1, 0.71, 1.0)]},
        "paraphrase": {"rate": 0.0625, "runs": {k: main[k] for k in fr.PARAPHRASE}},
        "minutes": 92.0,
        "date": "2026-12-05",
        "machine": "x86_64, 2 CPU cores (shared), 1 torch thread(s)",
    }


def test_arms_are_paired_by_seed_whatever_their_order_or_count(fr):
    r = results(fr)["main"]
    # GloFND: seed 0 closes (0.70-0.60)/(0.80-0.60), seed 1 (0.72-0.70)/(0.10); seed 2 has no gap
    closed = fr.gap_closed(r, fr.GLO)
    assert closed[:2] == pytest.approx([0.5, 0.2]) and closed[2] != closed[2]  # NaN
    # FastCLIP-v3 is listed seed 1 first: paired by seed, not by position
    assert fr.gap_closed(r, "FastCLIP-v3") == pytest.approx([-0.25, 0.5])
    pairs = fr.by_seed(r[fr.BASELINE], r["FastCLIP-v3"])
    assert [(b["seed"], m["seed"]) for b, m in pairs] == [(0, 0), (1, 1)]


def test_the_verdict_states_the_paired_difference_and_its_spread(fr):
    line = fr.verdict(results(fr)["main"], fr.GLO)
    # oracle - CLIP per seed: 20, 10, 0 points; GloFND - CLIP: 10, 2, 0
    assert line.startswith("over seeds 0, 1, 2, paired: oracle - CLIP +10.0 ± 10.0 points")
    assert "CLIP + GloFND - CLIP +4.0 ± 5.3 points (within its seed spread; 2 of 3 seeds" in line
    assert "closing 0.35 of the gap" in line  # the mean over the seeds with a gap


def test_an_arm_counts_only_when_calibrated(fr):
    cell = fr.calibrated(results(fr)["main"][fr.GLO])
    assert cell.endswith("(2 of 3 within [0.7, 1.5])")
    assert fr.calibrated(results(fr)["main"][fr.BASELINE]) == "-"


def test_the_page_section_is_replaced_between_its_markers(fr, tmp_path):
    out = tmp_path / "results.md"
    out.write_text("# Results\n\nkept above\n\n## Speed against open_clip's trainer\n\nkept\n")
    rules = {
        "seeds": [11],
        "runs": {
            name: [
                {
                    "seed": 11,
                    "ratios": [1.0, 2.0],
                    "max": 2.0,
                    "last_quarter_median": 2.0,
                    "mean": 1.5,
                }
            ]
            for name in fr.RULES
        },
    }
    (tmp_path / "fn_regime_rules.json").write_text(json.dumps(rules))
    images = tmp_path / "images"
    images.mkdir()
    for _ in range(2):  # a second report replaces the first, it does not add a second copy
        fr.report(results(fr), out, images)
    text = out.read_text()
    assert text.count(fr.BEGIN) == text.count(fr.END) == 1
    assert text.index("kept above") < text.index(fr.BEGIN) < text.index("## Speed against")
    assert "`python benchmarks/fn_regime.py --resume`" in text
    assert "| CLIP + GloFND | 3 |" in text and "| FastCLIP-v3 | 2 |" in text
    assert "| paper's rule (constant start, no offset) | `fnd.init=constant`" in text
    for name in ("calibration", "starts", "rules"):
        assert (images / f"fn_regime_{name}.png").stat().st_size > 1000
