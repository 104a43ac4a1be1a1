"""Zero-shot classification (docs/methods.md, "Evaluation definitions").

The class embedding of class ``c`` is the normalised mean of the normalised text embeddings of
``template(c)`` over the templates (the prompt ensemble); it is built by open_clip's
``build_zero_shot_classifier``. An image is classified by cosine similarity to the class
embeddings. Metrics: top-1 and top-5 accuracy, and mean per-class recall (the average over the
classes present in the labels of the share of their images classified correctly).

Class names and templates come from files (one per line; a template holds ``{c}`` or ``{}``
where the class name goes), from the dataset (clip_benchmark's ``classnames.txt`` and
``zeroshot_classification_templates.txt``, a shard manifest's ``label_names``, a
``ClassLabel``), or from open_clip's ImageNet lists (``imagenet`` / ``openai`` / ``simple``).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

import open_clip
import torch

from clipfnd.errors import UserError

from .datasets import read_lines

# for data without templates of its own (our shard folders, CSV, HF datasets)
DEFAULT_TEMPLATES = (
    "a photo of a {c}.",
    "a picture of a {c}.",
    "an image of a {c}.",
    "{c}",
)
BUILTIN_CLASSNAMES = {"imagenet": open_clip.IMAGENET_CLASSNAMES}
BUILTIN_TEMPLATES = {
    "openai": open_clip.OPENAI_IMAGENET_TEMPLATES,
    "imagenet": open_clip.OPENAI_IMAGENET_TEMPLATES,
    "simple": open_clip.SIMPLE_IMAGENET_TEMPLATES,
}

Template = str | Callable[[str], str]


def load_classnames(spec: str) -> list[str]:
    """``imagenet`` (open_clip's list), a JSON list, or a text file with one name a line."""
    if spec in BUILTIN_CLASSNAMES:
        return list(BUILTIN_CLASSNAMES[spec])
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"class names file {spec} does not exist "
            f"(or use one of: {', '.join(BUILTIN_CLASSNAMES)})"
        )
    if path.suffix == ".json":
        names = json.loads(path.read_text())
        if not (isinstance(names, list) and all(isinstance(n, str) for n in names)):
            raise UserError(f"{path}: expected a JSON list of class names")
        return names
    return read_lines(path)


def load_templates(spec: str) -> list[Template]:
    """``openai``/``imagenet``/``simple`` (open_clip's lists), or a file with one a line."""
    if spec in BUILTIN_TEMPLATES:
        return list(BUILTIN_TEMPLATES[spec])
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(
            f"templates file {spec} does not exist (or use one of: {', '.join(BUILTIN_TEMPLATES)})"
        )
    return list(read_lines(path))


def as_callable(template: Template) -> Callable[[str], str]:
    """A template string with ``{c}`` or ``{}`` as a function of the class name."""
    if callable(template):
        return template
    if "{c}" in template:
        return lambda c, t=template: t.replace("{c}", c)
    if "{}" in template:
        return lambda c, t=template: t.replace("{}", c)
    raise UserError(f"template {template!r} has no {{c}} or {{}} for the class name")


def class_embeddings(
    model: torch.nn.Module,
    tokenizer: Callable,
    classnames: Sequence[str],
    templates: Sequence[Template],
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """``[C, d]`` prompt-ensemble class embeddings (open_clip's classifier builder)."""
    if not classnames:
        raise UserError("zero-shot classification needs at least one class name")
    if not templates:
        raise UserError("zero-shot classification needs at least one template")
    fns = [as_callable(t) for t in templates]
    weights = open_clip.build_zero_shot_classifier(
        model,
        tokenizer=tokenizer,
        classnames=list(classnames),
        templates=fns,
        num_classes_per_batch=10,
        device=device,
        use_tqdm=False,
    )
    return weights.T.float()


def classification_metrics(
    scores: torch.Tensor,
    labels: torch.Tensor,
    prefix: str = "",
) -> dict[str, float]:
    """Top-1, top-5 and mean per-class recall of ``[N, C]`` scores against ``[N]`` labels."""
    if labels.numel() == 0:
        raise UserError("no labelled samples to classify")
    num_classes = scores.shape[1]
    if int(labels.min()) < 0 or int(labels.max()) >= num_classes:
        raise UserError(
            f"labels outside [0, {num_classes}): min {int(labels.min())}, "
            f"max {int(labels.max())} (wrong class names, or unlabelled samples?)"
        )
    k = min(5, num_classes)
    top = scores.topk(k, dim=1).indices
    correct = top == labels[:, None]
    top1 = correct[:, 0]
    present = labels.unique()
    recalls = torch.stack([top1[labels == c].double().mean() for c in present])
    return {
        f"{prefix}top1": top1.double().mean().item(),
        f"{prefix}top5": correct.any(1).double().mean().item(),
        f"{prefix}mean_per_class_recall": recalls.mean().item(),
    }


def zeroshot_metrics(
    image: torch.Tensor,
    labels: torch.Tensor,
    classes: torch.Tensor,
) -> dict[str, float]:
    """Metrics of normalised image embeddings ``[N, d]`` against class embeddings ``[C, d]``."""
    return classification_metrics(image.float() @ classes.float().T, labels)
