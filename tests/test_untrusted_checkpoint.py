"""A checkpoint from an untrusted source cannot run code on resume: every file of a real
checkpoint is replaced, one at a time, by a pickle that would create a file when unpickled,
and a resume from it refuses (one-line error) or ignores it; the file is never created."""

from __future__ import annotations

import pickle
import shutil
from pathlib import Path

import pytest

from clipfnd.config import load_config
from clipfnd.errors import UserError
from clipfnd.train.loop import train

pytestmark = pytest.mark.slow


class _Payload:
    def __init__(self, mark: Path):
        self.mark = mark

    def __reduce__(self):  # unpickling this calls open(mark, "w")
        return (open, (str(self.mark), "w"))


def _cfg(shapes, run: Path, *extra: str):
    return load_config(
        None,
        [
            f"output_dir={run}",
            f"data.train={shapes / 'train'}",
            "data.num_workers=0",
            "data.batch_size=64",
            "fnd.detector=glofnd",
            "train.progress=false",
            "train.report_to=none",
            "train.plots=false",
            "eval.at_end=false",
            *extra,
        ],
    )


@pytest.fixture(scope="module")
def checkpoint_run(shapes, tmp_path_factory):
    run = tmp_path_factory.mktemp("trusted") / "run"
    train(_cfg(shapes, run, "train.max_steps=2", "train.checkpoint_every=0"))
    (ckpt,) = (run / "checkpoints").iterdir()
    return run, ckpt.name


def test_every_file_replaced_by_a_pickle_is_refused_and_never_runs(
    checkpoint_run, shapes, tmp_path
):
    run, name = checkpoint_run
    files = sorted(p.name for p in (run / "checkpoints" / name).iterdir())
    assert {"model.safetensors", "tables.safetensors", "scheduler.json", "optimizer.bin"} <= set(
        files
    )
    assert not any(f.startswith("custom_checkpoint") for f in files)  # nothing pickled by us
    for victim in [*files, "custom_checkpoint_0.pkl"]:  # the last: what a pickling writer adds
        copy = tmp_path / victim / "run"
        shutil.copytree(run, copy)
        mark = tmp_path / victim / "pwned"
        (copy / "checkpoints" / name / victim).write_bytes(pickle.dumps(_Payload(mark)))
        named = str(copy / "checkpoints" / name)
        with pytest.raises(UserError, match="cannot load checkpoint|not a complete|corrupt"):
            train(_cfg(shapes, copy, f"resume={named}", "train.max_steps=3"))  # refused
        assert not mark.exists(), f"unpickling {victim} ran code"
        try:  # latest: refused, or skipped for a fresh start; never run
            train(_cfg(shapes, copy, "resume=latest", "train.max_steps=3"))
        except UserError:
            pass
        assert not mark.exists(), f"unpickling {victim} ran code (resume=latest)"


def test_a_bit_flip_is_caught_on_resume_eval_and_export(shapes, tmp_path, caplog):
    """Checksums recorded at publish time: a flipped byte in the weights makes resume=latest
    fall back (with a warning) to the checkpoint before, and a named resume, eval and export
    refuse."""
    from clipfnd.checkpoints import load_checkpoint
    from clipfnd.export import export_checkpoint

    run = tmp_path / "run"
    train(_cfg(shapes, run, "train.max_steps=2", "train.checkpoint_every=1"))
    first, second = sorted((run / "checkpoints").iterdir())
    weights = second / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0x10  # inside a tensor: safetensors alone would load it
    weights.write_bytes(bytes(data))

    with pytest.raises(UserError, match="does not match the checksum"):
        train(_cfg(shapes, run, f"resume={second}", "train.max_steps=3"))
    with pytest.raises(UserError, match="does not match the checksum"):
        load_checkpoint(second)
    with pytest.raises(UserError, match="does not match the checksum"):
        export_checkpoint(second, "open_clip", tmp_path / "export")
    assert not (tmp_path / "export").exists()
    with caplog.at_level("WARNING"):
        summary = train(_cfg(shapes, run, "resume=latest", "train.max_steps=3"))
    assert f"every process falls back to {first}" in caplog.text and summary["steps"] == 3
