"""Vision-only training end to end: every shipped digits config runs (shortened) and its kNN
accuracy beats the same encoder at random initialisation; image-only shards train; and a
2-process IFND run killed right after a clustering epoch resumes to the uninterrupted run's
losses and detection figures (the pseudo-labels come back bit for bit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from accelerate.utils import set_seed

from clipfnd.config import load_config, to_dict
from clipfnd.models.vision import vision_from_config
from clipfnd.train.loop import train
from clipfnd_eval.run import EvalModel, EvalOptions, run_eval

from runs import launch, launch_and_kill

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("simclr_digits_*.yaml"))
SHORT = [
    "train.epochs=2",
    "data.num_workers=0",  # the loader's workers are tested elsewhere; here, the configs
    "data.image_size=16",
    "train.progress=false",
    "train.report_to=none",
    "train.plots=false",
    "eval.every_epochs=0",
    "fnd.start_update=1",
    "fnd.start_mask=1",
    "fnd.cluster_every=1",
]


def _overrides(digits: Path, run: Path) -> list[str]:
    return [
        f"data.train={digits / 'train'}",
        f"data.val={digits / 'val'}",
        f"output_dir={run}",
        *SHORT,
    ]


@pytest.fixture(scope="module")
def random_init_knn(digits):
    """kNN top-1 of the tiny encoder as every config starts it (seed 0), before training."""
    cfg = load_config(CONFIGS[0], _overrides(digits, Path("unused")))
    set_seed(cfg.seed)
    bundle = vision_from_config(to_dict(cfg))
    opts = EvalOptions(
        task="knn",
        data=str(digits / "val"),
        train_data=str(digits / "train"),
        num_workers=0,
        progress=False,
    )
    return run_eval(EvalModel(bundle, {}), opts)["metrics"]["top1"]


def test_the_seven_digits_configs_exist():
    names = {p.stem.removeprefix("simclr_digits_") for p in CONFIGS}
    assert names == {"simclr", "sogclr", "glofnd", "ifnd", "sscl", "dcl", "hcl"}


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_short_run_of_each_config_beats_random_init(config, digits, tmp_path, random_init_knn):
    cfg = load_config(config, _overrides(digits, tmp_path / "run"))
    summary = train(cfg)
    knn = summary["eval"]["knn/top1"]
    assert knn > random_init_knn, (knn, random_init_knn)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in lines if "loss" in r]
    assert losses[-1] < losses[0]
    if cfg.fnd.detector in ("glofnd", "ifnd"):
        flagged = [r for r in lines if "fnd/precision" in r]
        assert flagged and max(r["fnd/flagged_share"] for r in flagged) > 0
    if cfg.fnd.detector == "ifnd":  # clustered at the start of epoch 1
        assert sum("fnd/epoch_start_seconds" in r for r in lines) == cfg.train.epochs - 1


def test_image_only_shards_train(tmp_path):
    """An image folder with class subfolders and no captions, built --images-only, trains."""
    from PIL import Image

    from clipfnd.cli.main import main

    rng = torch.Generator().manual_seed(0)
    for c, colour in enumerate(("red", "blue")):
        folder = tmp_path / "images" / f"class_{colour}"
        folder.mkdir(parents=True)
        for i in range(48):
            noise = (torch.rand(3, generator=rng) * 60).int().tolist()
            base = (200, 30, 30) if c == 0 else (30, 30, 200)
            Image.new("RGB", (24, 24), tuple(b + n for b, n in zip(base, noise))).save(
                folder / f"{i}.png"
            )
    args = ["data", "build", "--from", "imagefolder", "--input", str(tmp_path / "images")]
    args += ["--out", str(tmp_path / "shards"), "--shard-size", "32", "--label-column", "folder"]
    assert main([*args, "--images-only"]) == 0
    members = __import__("tarfile").open(tmp_path / "shards" / "shard-000000.tar").getnames()
    assert not any(m.endswith(".txt") for m in members)
    cfg = load_config(
        None,
        [
            "mode=simclr",
            f"data.train={tmp_path / 'shards'}",
            f"data.val={tmp_path / 'shards'}",
            "data.batch_size=32",
            "data.num_workers=0",
            "data.image_size=16",
            "model.proj_hidden=32",
            "model.proj_dim=16",
            "fnd.detector=oracle",
            f"output_dir={tmp_path / 'run'}",
            "train.progress=false",
            "train.report_to=none",
            "train.plots=false",
        ],
    )
    summary = train(cfg)
    assert summary["steps"] == 3 and summary["skipped_samples"] == 0
    assert summary["eval"]["knn/top1"] > 0.9  # two colours


@pytest.mark.distributed
def test_ifnd_two_processes_resume_after_clustering_epoch_is_exact(digits, tmp_path):
    """Epoch 0: 11 steps; the training set is clustered at the start of epoch 1 and a checkpoint
    is written at step 12, one step later. A run killed at step 14 resumes from it."""
    config = ROOT / "configs" / "simclr_digits_ifnd.yaml"
    common = [
        f"data.train={digits / 'train'}",
        f"data.val={digits / 'val'}",
        "train.epochs=2",
        "train.max_steps=16",
        "data.num_workers=0",  # the clustering and its resume are under test, not the loader
        "data.image_size=16",
        "train.log_every=1",
        "train.checkpoint_every=12",
        "train.keep_checkpoints=3",
        "train.progress=false",
        "train.report_to=none",
        "train.plots=false",
        "eval.every_epochs=0",
        "eval.at_end=false",
        "fnd.start_update=1",
        "fnd.start_mask=1",
        "fnd.accept_start=0.5",
    ]
    ref, run = tmp_path / "ref", tmp_path / "run"
    launch(config, *common, f"output_dir={ref}", processes=2)
    launch_and_kill(config, run, 14, *common, f"output_dir={run}", processes=2)
    launch(config, *common, f"output_dir={run}", "resume=latest", processes=2)

    def records(path):
        out = {}
        for line in (path / "metrics.jsonl").read_text().splitlines():
            if line.endswith("}"):
                rec = json.loads(line)
                if "loss" in rec:
                    out[rec["step"]] = rec
        return out

    got, want = records(run), records(ref)
    assert sorted(want) == list(range(1, 17))
    for step in range(13, 17):  # after the resume: same losses, same flags
        for key in ("loss", "fnd/flagged_share", "fnd/precision", "fnd/recall"):
            assert got[step][key] == pytest.approx(want[step][key], abs=1e-6), (step, key)
    assert want[16]["fnd/flagged_share"] > 0
