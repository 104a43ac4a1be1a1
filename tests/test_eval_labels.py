"""kNN and the linear probe compare evaluation labels with training labels by class name.

Each manifest numbers its own labels: a validation set that lacks some classes of the
training set numbers the rest from 0. The checkpoint is a randomly initialised
``clipfnd-tiny-vit``; the training split holds the very images of the evaluation split, so a
1-NN whose labels are matched correctly scores 1.0 whatever the model.
"""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from clipfnd.errors import UserError
from clipfnd_eval.processes import Processes
from clipfnd_eval.run import EvalOptions, run_eval
from data_pipelines.shards import write_split
from data_pipelines.synthetic import SyntheticSpec, generate, label_names

from checkpoints import write_checkpoint

SPEC = SyntheticSpec(num_concepts=6, image_size=32)
CPU = Processes(0, 1, torch.device("cpu"))
NAMES = label_names(SPEC)


def relabel(samples, keep: list[int]):
    """The samples of classes ``keep``, numbered by their position in ``keep``."""
    return [dataclasses.replace(s, label=keep.index(s.label)) for s in samples if s.label in keep]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("labels")
    samples = list(generate(SPEC, 48, "val"))
    present = sorted({s.label for s in samples})
    assert present == list(range(6))
    write_split(root / "train", samples, shard_size=24, label_names=NAMES, progress=False)
    # the evaluation split lacks classes 0 and 1: its labels 0..3 are training classes 2..5
    keep = [2, 3, 4, 5]
    sub = relabel(samples, keep)
    names = [NAMES[c] for c in keep]
    write_split(root / "val", sub, shard_size=24, label_names=names, progress=False)
    write_split(root / "val_unnamed", sub, shard_size=24, progress=False)
    # a class the training split lacks
    write_split(
        root / "val_new",
        sub,
        shard_size=24,
        label_names=[*names[:3], "purple unicorn"],
        progress=False,
    )
    return {"run": write_checkpoint(root / "run"), "root": root}


def options(task: str, data, val: str, **kw) -> EvalOptions:
    root = data["root"]
    return EvalOptions(
        task=task,
        data=str(root / val),
        train_data=str(root / "train"),
        batch_size=16,
        num_workers=0,
        progress=False,
        **kw,
    )


def test_knn_matches_labels_by_class_name(data):
    """1-NN finds each image itself in the training split; by integer every label is off by
    two classes (top-1 0.0), by name every one is right (1.0)."""
    res = run_eval(data["run"], options("knn", data, "val", k=1), CPU)
    assert res["data"]["label_mapping"] == "by name"
    assert res["metrics"]["top1"] == 1.0
    probe = run_eval(data["run"], options("linear-probe", data, "val"), CPU)
    assert probe["data"]["label_mapping"] == "by name"


def test_same_class_list_keeps_the_labels(data):
    res = run_eval(data["run"], options("knn", data, "train", k=1), CPU)
    assert res["data"]["label_mapping"] == "by name"
    assert res["metrics"]["top1"] == 1.0


def test_a_class_the_training_data_lacks_is_refused_before_encoding(data, monkeypatch):
    import clipfnd_eval.run as run_mod

    def never(*a, **k):
        raise AssertionError("encoded although the labels cannot be matched")

    monkeypatch.setattr(run_mod, "encode_dataset", never)
    with pytest.raises(
        UserError, match=r"1 of its 4 classes are not in the training data .*'purple unicorn'"
    ):
        run_eval(data["run"], options("knn", data, "val_new"), CPU)


def test_labels_without_names_are_compared_by_number_with_a_warning(data, caplog):
    with caplog.at_level(logging.WARNING):
        res = run_eval(data["run"], options("knn", data, "val_unnamed", k=1), CPU)
    assert res["data"]["label_mapping"] == "by number"
    assert res["metrics"]["top1"] == 0.0  # what integer labels give here
    assert "by number" in caplog.text and "val_unnamed" in caplog.text
