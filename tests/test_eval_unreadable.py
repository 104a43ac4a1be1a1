"""Images that cannot be read are skipped, counted and named with the reason, once.

A clip_benchmark retrieval set of 30 samples in shards of 10 whose every third image is cut in
half; the checkpoint is a randomly initialised ``clipfnd-tiny-vit``.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from test_eval_run import write_clip_benchmark

from clipfnd_eval.processes import Processes
from clipfnd_eval.run import EvalOptions, run_eval
from data_pipelines import DataError
from data_pipelines.synthetic import SyntheticSpec, generate, label_names

from checkpoints import write_checkpoint
from runs import torchrun_clipfnd

SPEC = SyntheticSpec(num_concepts=4, image_size=32)
CPU = Processes(0, 1, torch.device("cpu"))


def samples(cut) -> list[dict[str, bytes]]:
    """Captions repeat (one per concept); images ``i`` with ``cut(i)`` are truncated."""
    names = label_names(SPEC)
    return [
        {
            "jpg": s.image[: len(s.image) // 2] if cut(i) else s.image,
            "txt": f"a photo of a {names[s.label]}\n".encode(),
        }
        for i, s in enumerate(generate(SPEC, 30, "test"))
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("unreadable")
    return {
        "run": write_checkpoint(root / "run"),
        "third": write_clip_benchmark(
            root / "third", samples(lambda i: i % 3 == 0), "retrieval", shard_size=10
        ),
        "all": write_clip_benchmark(
            root / "all", samples(lambda i: True), "retrieval", shard_size=10
        ),
    }


def options(data, **kw) -> EvalOptions:
    return EvalOptions(
        task="retrieval", data=str(data), batch_size=8, num_workers=0, progress=False, **kw
    )


def test_unreadable_images_are_named_with_the_reason(data, caplog):
    with caplog.at_level(logging.WARNING):
        res = run_eval(data["run"], options(data["third"]), CPU)
    assert (res["data"]["skipped"], res["data"]["num_images"]) == (10, 20)
    examples = res["data"]["skipped_examples"]
    shard = data["third"] / "test" / "0.tar"
    assert [e["item"] for e in examples] == [
        f"{shard} item {i} (image_id 0/s000{i:05d})" for i in (0, 3, 6, 9)
    ] + [f"{data['third'] / 'test' / '1.tar'} item 2 (image_id 1/s00100002)"]
    assert all(e["reason"].startswith("OSError: ") for e in examples)
    warnings = [r.getMessage() for r in caplog.records if "could not be read" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith("encoding: skipped 10 of 30 images that could not be read")
    named = f"{shard} item 0 (image_id 0/s00000000), {shard} item 3 (image_id 0/s00000003), "
    assert f"e.g. {named}{shard} item 6 (image_id 0/s00000006): OSError: " in warnings[0]


def test_no_readable_image_names_the_reason_and_the_first_items(data):
    shard = data["all"] / "test" / "0.tar"
    with pytest.raises(DataError) as e:
        run_eval(data["run"], options(data["all"]), CPU)
    message = str(e.value)
    assert message.startswith("no readable image in the dataset (skipped 30, e.g. ")
    assert f"e.g. {shard} item 0 (image_id 0/s00000000), {shard} item 1 " in message
    assert f"{shard} item 2 (image_id 0/s00000002): OSError: " in message  # the first three
    assert "\n" not in message


@pytest.mark.distributed
def test_two_processes_warn_once_and_agree(data, tmp_path):
    """2 processes x 2 workers over 3 shards: one warning (the main process's) naming the same
    items, and the results (captions repeat: the matching by text too) of one process."""
    out = tmp_path / "two.json"
    proc = torchrun_clipfnd(
        "eval",
        "--checkpoint",
        str(data["run"]),
        "--task",
        "retrieval",
        "--data",
        str(data["third"]),
        "--out",
        str(out),
        "--batch-size",
        "4",
        "--num-workers",
        "2",
        "--no-progress",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stderr.count("could not be read") == 1, proc.stderr[-3000:]
    two = json.loads(out.read_text())
    one = run_eval(data["run"], options(data["third"]), CPU)
    assert two["processes"] == 2
    assert two["data"] == one["data"]
    assert two["data"]["duplicate_captions"] == {"texts": 4, "captions": 20}
    for k, v in one["metrics"].items():
        assert two["metrics"][k] == pytest.approx(v, abs=1e-6), k
