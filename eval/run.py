"""``clipfnd eval``: one evaluation task of a checkpoint on one dataset.

Tasks (definitions in docs/methods.md, "Evaluation definitions"):

- ``retrieval``: image->text and text->image Recall@1/5/10, mean and median rank;
- ``zeroshot``: top-1, top-5 and mean per-class recall with a prompt-ensemble classifier;
- ``linear-probe``: logistic regression on frozen features of ``train_data``; top-1;
- ``knn``: weighted 20-NN on frozen features of ``train_data``; top-1.

The linear probe and kNN read each evaluation label as the training label of the same class
name where both datasets name their classes (each numbers its own labels; ``label_mapping``).

Every check that can fail on the user's input (task, data layout, class names, templates,
labels) runs before any image is encoded.
"""

from __future__ import annotations

import logging
import os
from collections import Counter
from dataclasses import dataclass
from typing import Any

import torch

from clipfnd.checkpoints import LoadedCheckpoint, load_checkpoint
from clipfnd.errors import UserError
from clipfnd.models.factory import ClipBundle

from .datasets import EvalDataset
from .features import Features, encode_dataset
from .knn import DEFAULT_K, DEFAULT_TEMPERATURE, knn_metrics
from .layouts import open_dataset
from .linear_probe import linear_probe
from .processes import Processes, setup_processes
from .retrieval import grouped_retrieval_metrics, label_retrieval_metrics
from .zeroshot import (
    DEFAULT_TEMPLATES,
    class_embeddings,
    load_classnames,
    load_templates,
    zeroshot_metrics,
)

log = logging.getLogger(__name__)

TASKS = ("retrieval", "zeroshot", "linear-probe", "knn")
_warned_by_number: set[tuple[str, str]] = set()  # (data, train data) pairs warned about


@dataclass
class EvalModel:
    """What is evaluated: a model with its preprocessing and tokenizer, and what to say of it
    in the results (a checkpoint's provenance, or the training run's live step)."""

    bundle: ClipBundle
    info: dict[str, Any]

    @classmethod
    def from_checkpoint(cls, loaded: LoadedCheckpoint) -> EvalModel:
        return cls(loaded.bundle, loaded.describe())


@dataclass
class EvalOptions:
    task: str
    data: str
    train_data: str | None = None  # linear-probe / knn
    split: str | None = None  # clip_benchmark / HF: default "test"
    train_split: str | None = None  # default "train"
    classnames: str | None = None  # zeroshot: file or "imagenet"
    templates: str | None = None  # zeroshot: file or "openai" / "simple"
    batch_size: int = 256
    num_workers: int = 2
    image_column: str | None = None
    caption_column: str | None = None
    label_column: str | None = None
    k: int = DEFAULT_K
    temperature: float = DEFAULT_TEMPERATURE
    device: str | None = None  # default: cuda if available
    progress: bool = True


def _open(opts: EvalOptions, path: str, split: str | None, default_split: str) -> EvalDataset:
    return open_dataset(
        path,
        split=split,
        default_split=default_split,
        image_column=opts.image_column,
        caption_column=opts.caption_column,
        label_column=opts.label_column,
    )


def _prompts(opts: EvalOptions, ds: EvalDataset) -> tuple[list[str], list, dict[str, Any]]:
    if opts.classnames:
        classnames, names_from = load_classnames(opts.classnames), opts.classnames
    elif ds.classnames:
        classnames, names_from = list(ds.classnames), f"dataset ({ds.layout})"
    else:
        raise UserError(
            f"zero-shot classification needs class names and {ds.path} has none: pass "
            "--classnames FILE (one name a line) or --classnames imagenet"
        )
    if opts.templates:
        templates, templates_from = load_templates(opts.templates), opts.templates
    elif ds.templates:
        templates, templates_from = list(ds.templates), f"dataset ({ds.layout})"
    elif opts.classnames == "imagenet":
        templates, templates_from = load_templates("openai"), "openai"
    else:
        templates, templates_from = list(DEFAULT_TEMPLATES), "default"
    info = {
        "num_classes": len(classnames),
        "classnames": names_from,
        "num_templates": len(templates),
        "templates": templates_from,
    }
    return classnames, templates, info


def _labelled(f: Features, what: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    keep = f.label >= 0
    if not bool(keep.any()):
        raise UserError(f"the {what} data has no labels")
    return f.image[keep], f.label[keep], int((~keep).sum())


@dataclass
class LabelMapping:
    """How the evaluation labels are read as training labels (kNN, linear probe)."""

    rule: str  # "by name" or "by number"
    lookup: list[int] | None = None  # by name: the training label of each evaluation label
    num_names: int = 0  # by name: how many class names the evaluation data has

    def apply(self, labels: torch.Tensor, ds: EvalDataset) -> torch.Tensor:
        if self.lookup is None:
            return labels
        beyond = labels[labels >= self.num_names]
        if beyond.numel():
            raise UserError(
                f"{ds.path}: label {int(beyond[0])} has no class name (the data names "
                f"{self.num_names} classes), so it cannot be matched with the training labels"
            )
        return torch.tensor(self.lookup, dtype=labels.dtype)[labels]


def _repeated(names: list[str]) -> list[str]:
    return sorted(n for n, c in Counter(names).items() if c > 1)


def label_mapping(ds: EvalDataset, train_ds: EvalDataset) -> LabelMapping:
    """Match the labels of ``ds`` with those of ``train_ds`` by class name (each dataset
    numbers its own labels). Refuses an evaluation class the training data lacks (a classifier
    fit on it can never predict that class) and class lists with repeated names that differ;
    where only one dataset names its classes the labels are compared by number."""
    names, train_names = ds.classnames, train_ds.classnames
    if not (names and train_names):
        return LabelMapping("by number")
    if list(names) == list(train_names):
        return LabelMapping("by name")
    for which, listed in ((ds, names), (train_ds, train_names)):
        if _repeated(listed):
            raise UserError(
                f"{which.path}: class names repeat ({', '.join(map(repr, _repeated(listed)[:5]))})"
                f", so the labels of {ds.path} cannot be matched with those of {train_ds.path} "
                "by name: give both the same class list"
            )
    position = {n: i for i, n in enumerate(train_names)}
    missing = [n for n in names if n not in position]
    if missing:
        shown = ", ".join(map(repr, missing[:5])) + (" ..." if len(missing) > 5 else "")
        raise UserError(
            f"{ds.path}: {len(missing)} of its {len(names)} classes are not in the training "
            f"data {train_ds.path} ({shown}); a classifier fit on it can never predict them"
        )
    return LabelMapping("by name", [position[n] for n in names], len(names))


def _warn_by_number(ds: EvalDataset, train_ds: EvalDataset) -> None:
    """Once per pair of datasets: only one of them names its classes."""
    pair = (ds.path, train_ds.path)
    if pair in _warned_by_number or not (ds.classnames or train_ds.classnames):
        return
    _warned_by_number.add(pair)
    named, unnamed = (ds, train_ds) if ds.classnames else (train_ds, ds)
    log.warning(
        "%s names its classes and %s does not: their labels are compared by number "
        "(label i is taken as the same class in both)",
        named.path,
        unnamed.path,
    )


def run_eval(
    model: EvalModel | str | os.PathLike, opts: EvalOptions, processes: Processes | None = None
) -> dict[str, Any]:
    """Run ``opts.task`` on ``model`` (or on the checkpoint a path names); the results on the
    main process (``{}`` on the others)."""
    if opts.task not in TASKS:
        raise UserError(f"unknown task {opts.task!r}; choose one of {', '.join(TASKS)}")
    needs_train = opts.task in ("linear-probe", "knn")
    if needs_train and not opts.train_data:
        raise UserError(f"--task {opts.task} needs --train-data (the split to fit on)")
    ds = _open(opts, opts.data, opts.split, "test")
    if opts.task == "retrieval" and ds.kind == "classification":
        raise UserError(
            f"{ds.path} is a classification set (dataset_type.txt): it has no "
            "captions for retrieval; try --task zeroshot"
        )
    train_ds = _open(opts, opts.train_data, opts.train_split, "train") if needs_train else None
    mapping = label_mapping(ds, train_ds) if train_ds else None
    prompts = _prompts(opts, ds) if opts.task == "zeroshot" else None
    evaluated = (
        model if isinstance(model, EvalModel) else EvalModel.from_checkpoint(load_checkpoint(model))
    )

    if evaluated.bundle.tokenizer is None and opts.task in ("retrieval", "zeroshot"):
        raise UserError(
            f"--task {opts.task} needs a text tower, and {evaluated.info.get('checkpoint') or 'the model'} "
            "is a vision-only (mode: simclr) model: use --task knn or --task linear-probe"
        )
    processes = processes or setup_processes(opts.device)
    bundle = evaluated.bundle
    model = bundle.model.to(processes.device).eval()
    common = dict(
        processes=processes,
        batch_size=opts.batch_size,
        num_workers=opts.num_workers,
        progress=opts.progress,
    )
    tokenize = bundle.tokenizer if opts.task == "retrieval" else None
    feats = encode_dataset(model, ds, bundle.preprocess_val, tokenize, **common)
    train = (
        encode_dataset(
            model, train_ds, bundle.preprocess_val, None, desc="encoding train", **common
        )
        if train_ds
        else None
    )
    if not processes.is_main:
        return {}

    results: dict[str, Any] = {
        "task": opts.task,
        "model": evaluated.info,
        "data": _describe(ds, feats),
        "processes": processes.world,
    }
    if opts.task == "retrieval":
        results["metrics"] = _retrieval(feats, results["data"])
    elif opts.task == "zeroshot":
        classnames, templates, results["zeroshot"] = prompts
        image, labels, results["data"]["unlabelled"] = _labelled(feats, "evaluation")
        classes = class_embeddings(
            model, bundle.tokenizer, classnames, templates, processes.device
        ).cpu()
        results["metrics"] = zeroshot_metrics(image, labels, classes)
    else:
        image, labels, results["data"]["unlabelled"] = _labelled(feats, "evaluation")
        labels = mapping.apply(labels, ds)
        results["data"]["label_mapping"] = mapping.rule
        if mapping.rule == "by number":
            _warn_by_number(ds, train_ds)
        train_image, train_labels, train_unlabelled = _labelled(train, "training")
        results["train_data"] = {**_describe(train_ds, train), "unlabelled": train_unlabelled}
        if opts.task == "linear-probe":
            results["metrics"] = linear_probe(train_image, train_labels, image, labels)
        else:
            results["knn"] = {"k": opts.k, "temperature": opts.temperature}
            results["metrics"] = knn_metrics(
                train_image, train_labels, image, labels, k=opts.k, temperature=opts.temperature
            )
    return results


def _describe(ds: EvalDataset, feats: Features) -> dict[str, Any]:
    """What the results say of a dataset: where it is, what was read and what was not."""
    out = {**ds.describe(), "num_images": feats.num_items, "skipped": feats.skipped}
    if feats.skipped_examples:
        out["skipped_examples"] = feats.skipped_examples
    if feats.bad_parts:
        out["unreadable_parts"] = feats.bad_parts
    return out


def _retrieval(feats: Features, data_info: dict[str, Any]) -> dict[str, float]:
    """Retrieval metrics; concept-level ones too when each image has one caption and a label."""
    metrics, counts = grouped_retrieval_metrics(
        feats.image, feats.image_id, feats.text, feats.text_item, captions=feats.captions
    )
    data_info.update(counts)
    one_caption_each = torch.equal(feats.text_item, torch.arange(feats.num_items))
    if (
        one_caption_each
        and len(set(feats.image_id)) == feats.num_items
        and bool((feats.label >= 0).all())
    ):
        metrics.update(label_retrieval_metrics(feats.image, feats.text, feats.label))
    return metrics
