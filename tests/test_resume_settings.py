"""What a resume continues and what it changes (real 1-process runs, in this process):

- with ``data.resampled`` the steps after a resume equal an uninterrupted run's (the indices
  an epoch already used were forgotten, so repeats were no longer dropped the same way);
- the run's counters (bad samples skipped, ...) continue instead of restarting at 0;
- a changed ``optim.lr`` (what the non-finite stop advises) or ``optim.weight_decay`` is used
  and said, instead of the checkpoint's value being used while ``config.yaml`` records the
  new one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from shard_edits import corrupt_copy

from clipfnd.config import load_config
from clipfnd.train.loop import train

pytestmark = pytest.mark.slow

BASE = [
    "data.num_workers=0",
    "data.batch_size=64",
    "data.shuffle_buffer=100",
    "optim.lr=2e-3",
    "optim.warmup_steps=2",
    "fnd.detector=glofnd",
    "fnd.lr=0.1",
    "fnd.calibration_bank=0",  # measured per anchor in test_glofnd_calibration.py
    "train.log_every=1",
    "train.checkpoint_every=3",
    "train.keep_checkpoints=10",
    "train.progress=false",
    "train.report_to=none",
    "train.plots=false",
    "eval.at_end=false",
]


def _run(data: Path, run: Path, *extra: str) -> dict:
    cfg = load_config(None, [f"output_dir={run}", f"data.train={data}", *BASE, *extra])
    return train(cfg)


def _records(run: Path) -> dict[int, dict]:
    out = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["step"]] = rec
    return out


def _cut_after(reference: Path, copy: Path, step: int) -> None:
    """``copy``: the reference run as if killed after the checkpoint of ``step``."""
    shutil.copytree(reference, copy)
    for ckpt in (copy / "checkpoints").iterdir():
        if int(ckpt.name.split("_")[1]) > step:
            shutil.rmtree(ckpt)
    (copy / "summary.json").unlink()


def test_a_resampled_run_resumes_exactly(shapes, tmp_path):
    """448 of 512 samples an epoch from shards of 64 drawn with replacement: shards repeat
    within an epoch and their samples are dropped as repeats. The step-9 checkpoint lies in
    the middle of epoch 1; steps 10-14 after resuming from it equal the uninterrupted run's
    (they differed: the repeats of what came before the checkpoint were not dropped)."""
    resampled = ["data.resampled=true", "data.samples_per_epoch=448", "train.epochs=2"]
    ref = tmp_path / "ref"
    summary = _run(shapes / "train", ref, *resampled)
    assert summary["steps"] == 14 and summary["skipped_samples"] > 0  # repeats were dropped
    run = tmp_path / "resumed"
    _cut_after(ref, run, 9)
    _run(shapes / "train", run, *resampled, "resume=latest")
    want, got = _records(ref), _records(run)
    assert sorted(got) == list(range(1, 15))
    for step in range(10, 15):
        assert abs(got[step]["loss"] - want[step]["loss"]) <= 1e-6, (step, got[step], want[step])


def test_counters_continue_across_a_resume(shapes, tmp_path):
    """``data/skipped`` at every step, the epochs' counts and the summary's totals are those of
    the uninterrupted run: the bad samples before the checkpoint are not forgotten (the
    count used to restart at 0) nor counted twice; the elapsed time grows on."""
    data = corrupt_copy(
        shapes / "train", tmp_path / "bad", ("shard-000000.tar", "shard-000005.tar")
    )
    ref = tmp_path / "ref"
    summary = _run(data, ref, "train.epochs=2")
    assert summary["skipped_samples"] == 12  # 6 an epoch
    run = tmp_path / "resumed"
    _cut_after(ref, run, 9)  # in the middle of epoch 1
    again = _run(data, run, "train.epochs=2", "resume=latest")
    assert again["skipped_samples"] == summary["skipped_samples"]
    want, got = _records(ref), _records(run)
    for step in range(10, summary["steps"] + 1):
        assert got[step].get("data/skipped") == want[step].get("data/skipped"), step
    epochs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in epochs if "data/used" in r]
    assert [(r["epoch"], r["data/skipped"]) for r in epochs] == [(0, 6), (1, 6)]
    assert again["elapsed_seconds"] > got[9]["elapsed_seconds"] > 0


def test_a_new_learning_rate_on_resume_is_used_and_said(shapes, tmp_path, caplog):
    """What the non-finite stop advises: lower optim.lr and resume. The schedule continues at
    the step it reached, from the new base value (it kept the checkpoint's), and the changed
    weight decay is used too; each change is said in one line."""
    ref = tmp_path / "ref"
    _run(shapes / "train", ref, "train.max_steps=8", "optim.schedule=constant")
    run = tmp_path / "resumed"
    _cut_after(ref, run, 6)
    with caplog.at_level("INFO", logger="clipfnd"):
        _run(
            shapes / "train",
            run,
            "train.max_steps=8",
            "optim.schedule=constant",
            "resume=latest",
            "optim.lr=1e-6",
            "optim.weight_decay=0.05",
        )
    lrs = {s: r["lr"] for s, r in _records(run).items()}
    assert lrs[6] == pytest.approx(2e-3) and lrs[7] == pytest.approx(1e-6) == lrs[8]
    assert "the base learning rate changes from 0.002/0.002 (checkpoint) to 1e-06/1e-06" in (
        caplog.text
    )
    assert "optimizer weight_decay changes from 0.1 (checkpoint) to 0.05" in caplog.text
    state = json.loads((run / "checkpoints" / "step_00000008" / "trainer_state.json").read_text())
    assert state["config"]["optim"]["lr"] == 1e-6  # recorded what was used


def test_a_resume_keeps_the_detectors_state(shapes, tmp_path):
    """GloFND with the automatic masking start (a window of 4 calibrated steps whose anchors'
    own shares have settled; optim.lr 1e-5, so they settle in the second epoch) resumed from
    the last checkpoint before masking started, inside the second epoch: the steps in a row
    it had counted and the anchors' spread come back with the checkpoint, so masking starts at
    the same step again and every later loss equals the uninterrupted run's (counted afresh,
    masking would start 4 steps after the resume at the earliest)."""
    auto = ["train.epochs=2", "fnd.alpha=0.06", "fnd.start_mask=auto", "fnd.start_mask_window=4"]
    auto.append("optim.lr=1e-5")
    ref = tmp_path / "ref"
    summary = _run(shapes / "train", ref, *auto)
    start = summary["fnd_mask_start_step"]
    cut = 3 * ((start - 1) // 3)  # checkpoints every 3 steps
    assert start is not None and 9 <= cut < start < cut + 4
    run = tmp_path / "resumed"
    _cut_after(ref, run, cut)
    again = _run(shapes / "train", run, *auto, "resume=latest")
    assert again["fnd_mask_start_step"] == start
    want, got = _records(ref), _records(run)
    for step in range(cut + 1, summary["steps"] + 1):
        assert abs(got[step]["loss"] - want[step]["loss"]) <= 1e-6, step
