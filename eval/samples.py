"""A bounded prefix of a split's samples and their normalised features, as the training step
compares them: what ``clipfnd report`` scores and what training's per-anchor calibration
measures against (a bank of training samples)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch
from tqdm.auto import tqdm

from data_pipelines.progress import bar_disable

from .datasets import EvalDataset, Item

log = logging.getLogger(__name__)


@dataclass
class Sample:
    """One encoded sample of the split: its column in every similarity matrix is ``row``."""

    row: int
    index: int  # dataset index (-1: the layout has none)
    label: int
    caption: str
    item: Item


def collect(
    dataset: EvalDataset, limit: int, need_caption: bool, warn: bool = True
) -> tuple[list[Sample], int]:
    """The first ``limit`` usable items of the split, in dataset order (images not decoded);
    ``warn``: say which parts could not be read to their end."""
    samples: list[Sample] = []
    skipped = 0
    for _, item in dataset.iter_slice(0, 1):
        if not isinstance(item, Item):  # a part that could not be read to its end
            if warn:
                log.warning("skipped the rest of %s (%s)", item.name, item.reason)
            continue
        if need_caption and not item.captions:
            skipped += 1
            continue
        caption = item.captions[0] if item.captions else ""
        samples.append(Sample(len(samples), item.index, item.label, caption, item))
        if len(samples) >= limit:
            break
    return samples, skipped


@torch.no_grad()
def encode(
    ckpt: Any,
    mode: str,
    samples: list[Sample],
    batch_size: int,
    device: torch.device,
    progress: bool,
    warn: bool = True,
) -> tuple[dict[str, torch.Tensor], list[Sample], int]:
    """Normalised features of every sample, as the training step compares them: CLIP
    ``{"img", "txt"}`` (the model's image and caption embeddings), vision-only ``{"view"}``
    (the projection head's output, un-augmented). Samples whose image cannot be decoded are
    left out (the returned list). Not ``clipfnd_eval.features.encode_dataset``: that reads a
    whole split through ``encode_image`` (backbone features in vision-only runs), and the
    report needs a bounded prefix, the projections, and the items for thumbnails."""
    bundle = getattr(ckpt, "bundle", ckpt)  # a loaded checkpoint, or a model bundle
    model = bundle.model.to(device).eval()
    feats: dict[str, list[torch.Tensor]] = {}
    kept: list[Sample] = []
    bad = 0
    bar = tqdm(
        total=len(samples), desc="report: encoding", unit="sample", disable=bar_disable(progress)
    )
    for start in range(0, len(samples), batch_size):
        chunk, images = [], []
        for s in samples[start : start + batch_size]:
            try:
                images.append(bundle.preprocess_val(s.item.load_image()))
                chunk.append(s)
            except (OSError, ValueError) as e:
                bad += 1
                if warn:
                    log.warning("report: sample %d: cannot decode its image (%s)", s.index, e)
        bar.update(len(samples[start : start + batch_size]))
        if not chunk:
            continue
        x = torch.stack(images).to(device)
        if mode == "clip":
            feats.setdefault("img", []).append(model.encode_image(x, normalize=True).float())
            text = bundle.tokenizer([s.caption for s in chunk]).to(device)
            feats.setdefault("txt", []).append(model.encode_text(text, normalize=True).float())
        else:
            feats.setdefault("view", []).append(model(x).float())
        kept.extend(chunk)
    bar.close()
    for i, s in enumerate(kept):
        s.row = i
    return {k: torch.cat(v) for k, v in feats.items()}, kept, bad
