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
