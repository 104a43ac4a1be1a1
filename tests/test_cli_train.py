"""``clipfnd train`` through its CLI entry, in-process: what the summary prints for each
``eval.tasks`` combination, and that a run which cannot start leaves no folder behind."""

from __future__ import annotations

import json

import pytest

from clipfnd.cli.main import eval_lines, main


def _args(shapes, run, *extra: str) -> list[str]:
    return [
        "train",
        "configs/demo.yaml",
        f"output_dir={run}",
        f"data.train={shapes / 'train'}",
        f"data.val={shapes / 'val'}",
        "data.num_workers=0",
        "data.batch_size=64",
        "train.max_steps=2",
        "train.progress=false",
        "train.report_to=none",
        "train.plots=false",
        "eval.batch_size=128",
        *extra,
    ]


@pytest.mark.parametrize("tasks", [["retrieval"], ["zeroshot"], ["retrieval", "zeroshot"]])
def test_each_eval_tasks_combination_trains_evaluates_and_prints(shapes, tmp_path, capsys, tasks):
    run = tmp_path / "run"
    rc = main(_args(shapes, run, f"eval.tasks=[{','.join(tasks)}]", "eval.at_end=true"))
    out = capsys.readouterr().out
    assert rc == 0, out
    summary = json.loads((run / "summary.json").read_text())
    assert ("i2t_R@1" in summary["eval"]) == ("retrieval" in tasks)
    assert ("zeroshot/top1" in summary["eval"]) == ("zeroshot" in tasks)
    assert ("image->text R@1/5" in out) == ("retrieval" in tasks)
    assert ("zero-shot top-1/5" in out) == ("zeroshot" in tasks)


def test_summary_lines_for_partial_results():
    assert eval_lines({}) == []
    only_zs = eval_lines({"zeroshot/top1": 0.5})
    assert only_zs == ["zero-shot top-1/5 : 0.500"]


@pytest.mark.parametrize(
    "override,message",
    [
        ("data.train=/nonexistent/shards", "/nonexistent/shards"),
        ("model.name=no-such-model", "no-such-model"),
        ("data.batch_size=1024", "cannot fill one batch"),
        ("optim.accum_steps=9", "no optimiser step"),
    ],
)
def test_a_run_that_cannot_start_leaves_no_output_folder(
    shapes, tmp_path, capsys, override, message
):
    run = tmp_path / "deep" / "run"
    rc = main(_args(shapes, run, override))
    err = capsys.readouterr().err
    assert rc == 2 and message in err, err
    assert not run.exists() and not (tmp_path / "deep").exists()


def test_a_deepspeed_launch_is_refused_before_anything_is_built(
    shapes, tmp_path, capsys, monkeypatch
):
    """DeepSpeed (what `accelerate launch --use_deepspeed` sets): refused in one line."""
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    run = tmp_path / "run"
    rc = main(_args(shapes, run))
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "--use_deepspeed" in err[0] and "--use_fsdp" in err[0]
    assert not run.exists()


def test_user_errors_are_one_line_and_bugs_keep_their_traceback(
    shapes, tmp_path, capsys, monkeypatch
):
    import clipfnd.train.loop as loop

    rc = main(_args(shapes, tmp_path / "run", "fnd.alpha=2"))  # a user's mistake
    assert rc == 2 and "fnd.alpha must be in (0, 1)" in capsys.readouterr().err

    def broken(cfg):
        raise ValueError("an internal invariant failed")

    monkeypatch.setattr(loop, "train", broken)
    with pytest.raises(ValueError, match="internal invariant"):  # not swallowed into one line
        main(_args(shapes, tmp_path / "run2"))


def test_a_second_run_in_a_held_run_folder_is_refused_naming_the_holder(shapes, tmp_path, capsys):
    """Another live process holds the run folder: the run stops at start-up, naming it; once
    that process is gone (even killed), the folder is free again."""
    import socket
    import subprocess
    import sys

    run = tmp_path / "run"
    run.mkdir()
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from clipfnd.train.lock import RunLock; "
            f"RunLock({str(run)!r}).acquire(); print('held', flush=True); time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        rc = main(_args(shapes, run))
        err = capsys.readouterr().err
        assert rc == 2 and f"pid {holder.pid} on host {socket.gethostname()}" in err, err
        assert not (run / "checkpoints").exists() and not (run / "metrics.jsonl").exists()
    finally:
        holder.kill()  # the OS drops a killed holder's lock
        holder.wait()
    assert main(_args(shapes, run)) == 0


def test_train_help_lists_every_config_key_with_its_default(capsys):
    from clipfnd.config import Config, describe_keys

    with pytest.raises(SystemExit) as e:
        main(["train", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    rows = describe_keys()
    assert len(rows) > 80
    for key, default, _ in rows:
        assert f"  {key} " in out and default in out, key
    for section in Config.__dataclass_fields__:
        assert any(k == section or k.startswith(section + ".") for k, _, _ in rows), section
    assert "data.batch_size is the GLOBAL batch" in out and "--batch-size is per GPU" in out
    assert "optim.accum_mode" in out and "open_clip's --accum-freq" in out


def test_a_missing_val_split_is_refused_at_start_up(shapes, tmp_path, capsys):
    """data.val is checked before anything is built or written (it used to be found missing
    after training, the checkpoint written)."""
    run = tmp_path / "run"
    rc = main(_args(shapes, run, f"data.val={tmp_path / 'nowhere' / 'val'}"))
    err = capsys.readouterr().err
    assert rc == 2 and f"data.val='{tmp_path / 'nowhere' / 'val'}': no dataset at" in err, err
    assert not run.exists()


def test_help_names_every_command_and_the_defaults_that_depend_on_the_mode(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for command in ("data synthetic", "data digits", "data build", "data index", "data verify"):
        assert f"clipfnd {command}" in out, command
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    lines = capsys.readouterr().out.splitlines()
    for key, value in (
        ("model.name", "(by mode: clip -> clipfnd-tiny-vit, simclr -> tiny)"),
        ("loss.name", "(by mode: clip -> clip, simclr -> simclr)"),
        ("eval.tasks", "(by mode: clip -> [retrieval], simclr -> [knn])"),
    ):
        (row,) = [line for line in lines if line.startswith(f"  {key} ")]
        assert row.split(None, 1)[1] == value, row


def test_the_run_folder_has_a_log_timestamps_and_a_line_per_epoch(shapes, tmp_path):
    """RUN/train.log holds the console's log lines (rank 0) and the summary; every metrics
    line and the summary carry the wall-clock time and the seconds trained; each epoch has a
    line; a progress bar never writes carriage returns into a redirected log."""
    import datetime
    import os
    import subprocess
    import sys

    run = tmp_path / "run"
    args = _args(shapes, run, "train.max_steps=12", "train.log_every=4", "train.progress=true")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(tmp_path / "console.log", "w") as console:  # redirected: not a terminal
        proc = subprocess.run(
            [sys.executable, "-m", "clipfnd", *args], stdout=console, stderr=console, env=env
        )
    with open(tmp_path / "console.log", "a") as console:  # the data commands' bars too
        subprocess.run(
            [sys.executable, "-m", "clipfnd", "data", "synthetic", "--out", str(tmp_path / "d")]
            + ["--num-samples", "64", "--num-val", "0", "--shard-size", "32"],
            stdout=console,
            stderr=console,
            env=env,
            check=True,
        )
    text = (tmp_path / "console.log").read_text()
    assert proc.returncode == 0, text[-3000:]
    assert "\r" not in text
    log = (run / "train.log").read_text()
    assert "\r" not in log and log.startswith("=== ") and f"clipfnd train in {run}" in log
    for needle in (
        "epoch 0 [256/512 samples, 50%] step 4/12: loss ",
        "epoch 0 done: 512 samples in ",
        "epoch 1: the run reached its last step (12; train.max_steps=12) after 4 of",
        "epoch 1 done: 256 samples in ",
        "=== clipfnd run summary ===",
        "image->text R@1/5 : ",
    ):
        assert needle in log, needle
        assert needle in text, needle  # what the console showed
    assert "WARNING" not in log  # a run cut by train.max_steps is no false alarm
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    elapsed = [r["elapsed_seconds"] for r in records]
    assert elapsed == sorted(elapsed) and elapsed[0] > 0
    for r in records:
        datetime.datetime.fromisoformat(r["time"])
    epochs = [r for r in records if "data/used" in r]
    assert [r["epoch"] for r in epochs] == [0, 1]
    assert all(r["epoch_seconds"] > 0 and r["epoch_samples_per_sec"] > 0 for r in epochs)
    summary = json.loads((run / "summary.json").read_text())
    datetime.datetime.fromisoformat(summary["time"])
    assert summary["elapsed_seconds"] >= elapsed[-2]
