"""Two processes (``torchrun``, gloo on CPU) give exactly the results of one process."""

from __future__ import annotations

import json

import pytest
import torch

from clipfnd_eval.processes import Processes
from clipfnd_eval.run import EvalOptions, run_eval
from data_pipelines.shards import write_split
from data_pipelines.synthetic import SyntheticSpec, generate, label_names

from checkpoints import write_checkpoint
from runs import torchrun_clipfnd

pytestmark = pytest.mark.distributed


def test_two_processes_equal_one(tmp_path):
    spec = SyntheticSpec(num_concepts=8, image_size=32)
    # 3 uneven shards read by 2 processes x 2 workers: readers stride over items
    write_split(
        tmp_path / "val",
        generate(spec, 50, "val"),
        shard_size=20,
        label_names=label_names(spec),
        progress=False,
    )
    run = write_checkpoint(tmp_path / "run")
    out = tmp_path / "two.json"
    proc = torchrun_clipfnd(
        "eval",
        "--checkpoint",
        str(run),
        "--task",
        "retrieval",
        "--data",
        str(tmp_path / "val"),
        "--out",
        str(out),
        "--batch-size",
        "8",
        "--num-workers",
        "2",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    one = run_eval(
        run,
        EvalOptions(task="retrieval", data=str(tmp_path / "val"), num_workers=0, progress=False),
        Processes(0, 1, torch.device("cpu")),
    )
    assert two["processes"] == 2 and one["processes"] == 1
    assert two["data"] == one["data"]  # every item once: 50 images, 50 captions
    assert two["data"]["images"] == 50
    for k, v in one["metrics"].items():
        assert two["metrics"][k] == pytest.approx(v, abs=1e-6), k
