"""Small temperatures train: the debiased losses (DCL, HCL, SSCL) are computed in log space,
so ``loss.tau=0.01`` gives finite losses from the first step (``e^{s/t}`` alone overflows
float32 there)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from clipfnd.config import load_config
from clipfnd.train.loop import train

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("name", ["hcl", "sscl"])
def test_debiased_loss_trains_at_temperature_001(name, digits, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(
        ROOT / "configs" / "simclr_digits_hcl.yaml",
        [
            f"data.train={digits / 'train'}",
            "data.val=null",
            f"output_dir={run}",
            f"loss.name={name}",
            "loss.tau=0.01",
            "train.max_steps=3",
            "train.log_every=1",
            "train.max_nonfinite_steps=1",
            "data.batch_size=32",
            "data.image_size=16",
            "data.num_workers=0",
            "train.progress=false",
            "train.report_to=none",
            "train.plots=false",
            "eval.every_epochs=0",
        ],
    )
    train(cfg)
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses), losses
