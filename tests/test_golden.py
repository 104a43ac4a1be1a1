"""Golden losses: a few seeded steps of the demo recipe (and two other objectives) on the test
shapes must give the losses checked in under ``tests/golden/losses.json`` (1e-6).

A refactoring that changes no behaviour keeps these equal. A change that is meant to alter
the numbers regenerates them, and says so in its commit:

    CLIPFND_WRITE_GOLDEN=1 .venv/bin/python -m pytest tests/test_golden.py
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from clipfnd.config import load_config
from clipfnd.train.loop import train

GOLDEN = Path(__file__).parent / "golden" / "losses.json"
CONFIG = Path(__file__).parent.parent / "configs" / "demo.yaml"

# 8 steps an epoch on the test shapes; thresholds learn from step 1, negatives are removed
# from epoch 1 (steps 9-12), so every part of each objective runs.
COMMON = [
    "data.batch_size=64",
    "data.num_workers=0",
    "data.shuffle_buffer=100",
    "train.epochs=2",
    "train.max_steps=12",
    "fnd.start_update=0",
    "fnd.start_mask=1",
    "fnd.alpha=0.06",
    "fnd.lr=0.1",
    "optim.warmup_steps=2",
    "train.log_every=1",
    "train.progress=false",
    "train.report_to=none",
    "train.plots=false",
    "eval.at_end=false",
    "train.checkpoint_every=0",
]
RUNS = {
    "demo_clip_glofnd": [],
    "fastclip_v3_glofnd": ["loss.name=fastclip_v3", "loss.gamma_decay_epochs=2"],
    "sogclr_oracle_attract": ["loss.name=sogclr", "fnd.detector=oracle", "fnd.removal=attract"],
    "clip_glofnd_attract_accum": [  # recorded before cached accumulation became the default
        "fnd.removal=attract",
        "optim.accum_steps=2",
        "optim.accum_mode=independent",
        "train.max_steps=6",
    ],
}


def _losses(run: Path) -> list[float]:
    recs = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in recs if "loss" in r]


@pytest.mark.parametrize("name", list(RUNS))
def test_seeded_losses_equal_the_golden_ones(name, shapes, tmp_path):
    run = tmp_path / name
    cfg = load_config(
        CONFIG,
        [
            f"output_dir={run}",
            f"data.train={shapes / 'train'}",
            "data.val=null",
            *COMMON,
            *RUNS[name],
        ],
    )
    train(cfg)
    got = _losses(run)
    if os.environ.get("CLIPFND_WRITE_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        golden = json.loads(GOLDEN.read_text()) if GOLDEN.exists() else {}
        golden[name] = got
        GOLDEN.write_text(json.dumps(golden, indent=1, sort_keys=True) + "\n")
    want = json.loads(GOLDEN.read_text())[name]
    assert len(got) == len(want)
    for step, (a, b) in enumerate(zip(got, want), start=1):
        assert abs(a - b) <= 1e-6, (name, step, a, b)
