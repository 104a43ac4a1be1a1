"""Start-up checks and stops that end in one line (issue 32's cases): ``fnd.alpha`` against
the batch, a detector state that does not hold up, class names for zero-shot, weights of
another model, and Ctrl-C during training."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import safetensors.torch

from clipfnd.checkpoints import find_latest, is_valid
from clipfnd.cli.main import main
from clipfnd.fnd.glofnd import GloFND
from clipfnd.state import StateTables

from runs import write_config


def _args(shapes, run, *extra: str) -> list[str]:
    return [
        "train",
        "/dev/null",
        f"output_dir={run}",
        "model.name=clipfnd-tiny-vit",
        f"data.train={shapes / 'train'}",
        f"data.val={shapes / 'val'}",
        "data.num_workers=0",
        "train.progress=false",
        "train.report_to=none",
        "train.plots=false",
        "eval.batch_size=128",
        *extra,
    ]


# --- fnd.alpha against the batch (case 3) --------------------------------------------------
def test_an_alpha_below_one_flag_per_global_batch_is_refused_at_start_up(shapes, tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(_args(shapes, run, "data.batch_size=32", "fnd.detector=glofnd", "fnd.alpha=1e-6"))
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not run.exists()
    assert err == (
        "clipfnd: error: fnd.alpha=1e-06 asks for less than one flagged negative in a global "
        "batch (992 negatives per anchor type): the smallest share a batch can flag is 1/992 = "
        "0.00101; raise fnd.alpha to at least that, or data.batch_size until a global batch "
        "holds 1/alpha = 1e+06 negatives or more"
    )


def test_an_alpha_below_one_flag_per_row_starts_from_the_batch_and_flags_alpha(
    shapes, tmp_path, caplog
):
    """At batch 32 an anchor has 31 negatives: alpha 0.002 is a fifteenth of one flag. A first
    visit's threshold used to be the quantile between the row's two largest, flagging its
    hardest negative (16 x alpha, and a warning that advised the offset, already on). It now
    starts at the quantile over the whole global batch (no row holds an estimate of its own),
    start-up says so, and the run flags about alpha: no calibration warning."""
    run = tmp_path / "run"
    args = ["data.batch_size=32", "fnd.detector=glofnd", "fnd.alpha=2e-3", "train.epochs=1"]
    with caplog.at_level(logging.INFO):
        assert main(_args(shapes, run, *args, "eval.at_end=false")) == 0
    text = caplog.text
    assert "fnd.alpha=0.002 is below 1/32, one flag in an anchor's 31 negatives" in text
    assert "starts at the quantile over the whole global batch" in text
    # with the queue of recent columns (1024 by default) a row holds 2.1 flags: the quantile
    # rule, its estimates from the batch and the queue once that is full enough
    assert "thresholds learn with fnd.optimizer=quantile" in text
    assert "GloFND flagged" not in text


# --- the detector's state in a checkpoint (case 7) -----------------------------------------
@pytest.mark.parametrize(
    "edit,message",
    [
        ({"offsets": {"img": float("nan"), "txt": 0.0}}, r"offsets.img=nan is not a finite"),
        ({"offsets": {"img": 1e30, "txt": 0.0}}, r"offsets.img=1e\+30 is not a finite"),
        ({"shared": {"img": 1.5, "txt": None}}, r"shared.img=1.5 is not a finite number in"),
        ({"masked_from": 99}, r"masked_from=99 is not a step of the 8 taken"),
        ({"masked_from": 0}, r"masked_from=0 is not a step of the 8 taken"),
        ({"epoch_counts": [1.0, float("inf")]}, r"epoch_counts=.* is not two counts"),
        ({"thresholds": [0.5]}, r"unknown keys \['thresholds'\]"),
    ],
)
def test_a_detector_state_is_checked_whole_before_any_of_it_is_used(edit, message):
    def glofnd() -> GloFND:
        kw = dict(lr=0.05, optimizer="adam", beta1=0.9, beta2=0.98, init_threshold=1.0)
        kw |= dict(bias_correction="sample", start_update=0, start_mask=0, offset=True)
        return GloFND(StateTables(8), ("img", "txt"), alpha=0.1, init="quantile", **kw)

    good = glofnd()
    good.steps, good.masked_from, good.offsets = 8, 3, {"img": 0.1, "txt": -0.2}
    state = json.loads(json.dumps(good.state_dict()))
    fresh = glofnd()
    fresh.load_state_dict(state)  # the sound one loads
    assert fresh.state_dict() == state
    target = glofnd()
    with pytest.raises(ValueError, match=message):
        target.load_state_dict(json.loads(json.dumps({**state, **edit})))
    assert target.steps == 0 and target.offsets == {"img": None, "txt": None}  # nothing taken


# --- class names for zero-shot, at start-up (case 8) ---------------------------------------
@pytest.fixture(scope="module")
def unnamed_val(tmp_path_factory):
    """A validation split whose manifest has labels but no class names."""
    from data_pipelines import synthetic
    from data_pipelines.shards import write_split

    root = tmp_path_factory.mktemp("unnamed")
    spec = synthetic.SyntheticSpec(num_concepts=16, seed=3, image_size=32)
    write_split(root / "val", synthetic.generate(spec, 64, "val"), shard_size=64, progress=False)
    names = root / "names.txt"
    names.write_text("\n".join(synthetic.label_names(spec)) + "\n")
    return root


def test_zero_shot_without_class_names_is_refused_at_start_up_with_the_key_to_set(
    shapes, unnamed_val, tmp_path, capsys
):
    run = tmp_path / "run"
    args = [f"data.val={unnamed_val / 'val'}", "eval.tasks=zeroshot", "train.max_steps=2"]
    args += ["data.batch_size=64"]
    assert main(_args(shapes, run, *args)) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "zero-shot classification needs class names" in err
    assert "set eval.classnames=FILE" in err and "--classnames" not in err
    assert not run.exists()  # found before training, not after
    names = unnamed_val / "names.txt"
    assert main(_args(shapes, run, *args, f"eval.classnames={names}")) == 0
    assert "zeroshot/top1" in json.loads((run / "summary.json").read_text())["eval"]


# --- weights of another model (case 9) -----------------------------------------------------
def test_weights_of_another_model_are_named_in_one_line(shapes, tmp_path, capsys):
    from clipfnd.models import create_clip

    weights = tmp_path / "tiny.safetensors"
    safetensors.torch.save_file(create_clip("clipfnd-tiny-vit").model.state_dict(), str(weights))
    args = ["eval", "--model", "RN50", "--pretrained", str(weights), "--task", "retrieval"]
    assert main([*args, "--data", str(shapes / "val"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"clipfnd: error: the weights in {weights} are those of model clipfnd-tiny-vit, not RN50: "
        "name that model (model.name / --model clipfnd-tiny-vit)"
    )
    run = tmp_path / "run"
    over = ["model.name=clipfnd-small-vit", f"model.pretrained={weights}"]
    assert main(_args(shapes, run, *over)) == 2
    err = capsys.readouterr().err.strip()
    assert err.endswith(
        "are those of model clipfnd-tiny-vit, not clipfnd-small-vit: name that "
        "model (model.name / --model clipfnd-tiny-vit)"
    ), err


# --- Ctrl-C during training (case 11) ------------------------------------------------------
@pytest.mark.slow
def test_ctrl_c_during_checkpoint_writes_ends_in_one_line_naming_a_complete_checkpoint(
    shapes, tmp_path
):
    """SIGINT (what Ctrl-C sends) to a run that writes a checkpoint after every step, once its
    first checkpoint is being written: one line naming the newest complete checkpoint, exit
    130, and that checkpoint is complete (what resume=latest reads; a resume's exactness is
    tests/test_train_e2e.py's)."""
    run = tmp_path / "run"
    # long enough that the signal always finds it training (it is sent at the first checkpoint)
    extra = {"train.checkpoint_every": 1, "train.max_steps": 48, "eval.at_end": False}
    extra |= {"data.num_workers": 0}
    cfg = write_config(tmp_path / "c.yaml", shapes, run, extra)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    cmd = [sys.executable, "-m", "clipfnd", "train", str(cfg)]
    # SIGINT as a terminal delivers it: a shell that starts jobs in the background (CI's may)
    # has them ignore SIGINT, which a child inherits and Python then leaves alone
    proc = subprocess.Popen(
        cmd,
        stderr=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    ckpts = run / "checkpoints"
    deadline = time.monotonic() + 120
    while not (ckpts.is_dir() and any(ckpts.iterdir())) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "KeyboardInterrupt" not in err, err[-3000:]
    lines = [x for x in err.splitlines() if x.startswith("clipfnd:")]
    assert len(lines) == 1 and lines[0].startswith("clipfnd: error: interrupted; "), err[-2000:]
    latest = find_latest(run)
    if latest is None:
        assert lines[0] == "clipfnd: error: interrupted; no checkpoint of this run was written yet"
    else:
        assert lines[0] == (
            f"clipfnd: error: interrupted; the newest complete checkpoint is {latest} "
            "(resume=latest continues from it)"
        )
        assert is_valid(latest)
