"""What a resumed run leaves in its folder: ``metrics.jsonl`` holds every step once."""

from __future__ import annotations

import json
from types import SimpleNamespace

from clipfnd.train.metrics import MetricsWriter


class _Acc(SimpleNamespace):
    is_main_process = True

    def log(self, *a, **k):
        pass


def test_resume_keeps_only_the_lines_up_to_the_resumed_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 1.0 / s}) for s in range(1, 11)]
    path.write_text("\n".join(lines) + "\n" + '{"step": 11, "lo')  # a line cut by a kill
    w = MetricsWriter(tmp_path, _Acc(), fresh=False, keep_until=6)
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3, 4, 5, 6]
    w.write({"step": 7, "loss": 0.5})
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == list(range(1, 8))
    MetricsWriter(tmp_path, _Acc(), fresh=True)
    assert path.read_text() == ""


def test_corrupt_trainer_states_are_named_and_skipped_with_a_warning(tmp_path, caplog):
    import pytest

    from clipfnd.checkpoints import find_latest, read_trainer_state
    from clipfnd.errors import CheckpointError

    ckpts = tmp_path / "checkpoints"
    good, bad_value, bad_json = (ckpts / f"step_0000000{i}" for i in (1, 2, 3))
    for c, state in (
        (good, '{"step": 1, "epoch": 0, "world_size": 1}'),
        (bad_value, '{"step": 2, "world_size": "x"}'),
        (bad_json, '{"step": 3, '),
    ):
        c.mkdir(parents=True)
        (c / "trainer_state.json").write_text(state)
        (c / "loader_rank0.json").write_text("{}")
    with pytest.raises(CheckpointError, match="world_size='x' is not an integer >= 1"):
        read_trainer_state(bad_value)
    with pytest.raises(CheckpointError, match="is corrupt"):
        read_trainer_state(bad_json)
    with caplog.at_level("WARNING"):
        assert find_latest(tmp_path) == good
    assert "step_00000003 is incomplete or corrupt" in caplog.text
    assert "step_00000002 is incomplete or corrupt" in caplog.text


def test_a_full_disk_while_checkpointing_is_one_line_naming_the_checkpoint(
    shapes, tmp_path, monkeypatch
):
    """What a full disk looks like from torch's writer ("basic_ios::clear: iostream error")
    becomes one line naming the checkpoint and the last complete one."""
    import accelerate
    import pytest

    from clipfnd.config import load_config
    from clipfnd.train.loop import train
    from clipfnd.train.save_resume import CheckpointWriteError

    def full(self, *a, **k):
        raise RuntimeError(
            "[enforce fail at inline_container.cc:595] . basic_ios::clear: iostream error"
        )

    monkeypatch.setattr(accelerate.Accelerator, "save_state", full)
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={shapes / 'train'}",
            "data.num_workers=0",
            "train.max_steps=2",
            "train.progress=false",
            "train.report_to=none",
            "train.plots=false",
            "eval.at_end=false",
        ],
    )
    with pytest.raises(CheckpointWriteError, match="cannot write the checkpoint of step 2") as e:
        train(cfg)
    assert "basic_ios" in str(e.value) and "\n" not in str(e.value)
