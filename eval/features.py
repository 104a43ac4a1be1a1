"""Embedding an evaluation dataset: every item once, batched, gathered, in dataset order.

Each process reads its slice of the dataset (and each DataLoader worker a slice of that, see
:meth:`eval.datasets.EvalDataset.iter_slice`), encodes images (and captions, when asked) under
``torch.no_grad``, and the rows of all processes are gathered, sorted by item key and
de-duplicated. The result is the same on any number of processes and workers.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from clipfnd.distributed import gather_objects, gather_uneven
from data_pipelines import DataError
from data_pipelines.loader import worker_context

from .datasets import BadPart, EvalDataset
from .processes import Processes

log = logging.getLogger(__name__)


@dataclass
class Features:
    """Normalised embeddings of a dataset's items, sorted by key.

    ``text[j]`` is a caption of item ``text_item[j]`` (a row of ``image``).
    """

    image: torch.Tensor  # [N, d]
    key: torch.Tensor  # [N]
    label: torch.Tensor  # [N], -1: none
    image_id: list[str]  # [N]
    text: torch.Tensor | None  # [M, d]
    text_item: torch.Tensor | None  # [M]
    skipped: int  # items whose image could not be read
    index: torch.Tensor | None = None  # [N] dense dataset indices (-1: the layout has none)
    bad_parts: list[str] = field(default_factory=list)  # shards that could not be read to the end

    @property
    def num_items(self) -> int:
        return self.image.shape[0]


class _Reader(IterableDataset):
    def __init__(
        self,
        dataset: EvalDataset,
        transform: Callable,
        tokenize: Callable | None,
        rank: int,
        world: int,
    ):
        super().__init__()
        self.dataset, self.transform, self.tokenize = dataset, transform, tokenize
        self.rank, self.world = rank, world

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (0, 1) if info is None else (info.id, info.num_workers)
        reader, readers = self.rank * workers + worker, self.world * workers
        for key, item in self.dataset.iter_slice(reader, readers):
            if isinstance(item, BadPart):
                yield {
                    "bad": True,
                    "bad_part": f"{item.name}: unreadable after {item.position} "
                    f"items ({item.reason})",
                }
                continue
            try:
                image = self.transform(item.load_image())
            except Exception as e:  # unreadable image: counted, not fatal
                log.debug("item %s: %s", key, e)
                yield {"bad": True}
                continue
            out = {
                "bad": False,
                "key": key,
                "image": image,
                "label": item.label,
                "image_id": item.image_id,
                "index": item.index,
            }
            if self.tokenize is not None:
                out["text"] = self.tokenize(item.captions) if item.captions else None
                out["num_captions"] = len(item.captions)
            yield out


def _collate(items: list[dict]) -> dict:
    good = [i for i in items if not i["bad"]]
    parts = [i["bad_part"] for i in items if "bad_part" in i]
    out = {"skipped": len(items) - len(good) - len(parts), "n": len(good), "bad_parts": parts}
    if not good:
        return out
    out["image"] = torch.stack([g["image"] for g in good])
    out["key"] = torch.tensor([g["key"] for g in good], dtype=torch.long)
    out["label"] = torch.tensor([g["label"] for g in good], dtype=torch.long)
    out["index"] = torch.tensor([g["index"] for g in good], dtype=torch.long)
    out["image_id"] = [g["image_id"] for g in good]
    if "num_captions" in good[0]:
        texts = [g["text"] for g in good if g["text"] is not None]
        out["text"] = torch.cat(texts) if texts else None
        counts = torch.tensor([g["num_captions"] for g in good])
        out["text_owner"] = torch.repeat_interleave(out["key"], counts)
        out["text_position"] = torch.cat([torch.arange(int(c)) for c in counts])
    return out


@torch.no_grad()
def encode_dataset(
    model: torch.nn.Module,
    dataset: EvalDataset,
    transform: Callable,
    tokenize: Callable | None = None,
    *,
    processes: Processes,
    batch_size: int = 256,
    num_workers: int = 0,
    progress: bool = True,
    desc: str = "encoding",
) -> Features:
    """Normalised image embeddings of every item (and of every caption if ``tokenize``)."""
    model.eval()
    device = processes.device
    reader = _Reader(dataset, transform, tokenize, processes.rank, processes.world)
    loader = DataLoader(
        reader,
        batch_size=batch_size,
        num_workers=num_workers,
        collate_fn=_collate,
        multiprocessing_context=worker_context() if num_workers else None,
    )
    parts: dict[str, list] = {
        k: [] for k in ("image", "key", "label", "index", "text", "owner", "pos")
    }
    image_ids: list[tuple[int, str]] = []
    skipped = 0
    bad_parts: list[str] = []
    total = None
    if dataset.num_items is not None:
        total = (dataset.num_items + processes.world - 1) // processes.world
    bar = tqdm(total=total, desc=desc, unit="image", disable=not (progress and processes.is_main))
    for batch in loader:
        skipped += batch["skipped"]
        for bad in batch["bad_parts"]:
            log.warning("%s: skipped the rest of %s", desc, bad)
            bad_parts.append(bad)
        bar.update(batch["n"] + batch["skipped"])
        if not batch["n"]:
            continue
        parts["image"].append(model.encode_image(batch["image"].to(device), normalize=True).float())
        parts["key"].append(batch["key"].to(device))
        parts["label"].append(batch["label"].to(device))
        parts["index"].append(batch["index"].to(device))
        image_ids.extend(zip(batch["key"].tolist(), batch["image_id"], strict=True))
        if batch.get("text") is not None:
            text = model.encode_text(batch["text"].to(device), normalize=True)
            parts["text"].append(text.float())
            parts["owner"].append(batch["text_owner"].to(device))
            parts["pos"].append(batch["text_position"].to(device))
    bar.close()
    return _gather_sorted(
        parts, image_ids, skipped, device, with_text=tokenize is not None, bad_parts=bad_parts
    )


def _cat(chunks: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    return torch.cat(chunks) if chunks else empty


def _gather_sorted(
    parts: dict[str, list],
    image_ids: list[tuple[int, str]],
    skipped: int,
    device: torch.device,
    with_text: bool,
    bad_parts: list[str] | None = None,
) -> Features:
    dim = parts["image"][0].shape[1] if parts["image"] else 0
    # every rank must agree on the width of empty tensors before gathering
    dim = int(gather_uneven(torch.tensor([dim], device=device)).max().item())
    no_rows = torch.zeros((0, dim), device=device)
    no_ids = torch.zeros((0,), dtype=torch.long, device=device)
    image = gather_uneven(_cat(parts["image"], no_rows)).cpu()
    key = gather_uneven(_cat(parts["key"], no_ids)).cpu()
    label = gather_uneven(_cat(parts["label"], no_ids)).cpu()
    index = gather_uneven(_cat(parts["index"], no_ids)).cpu()
    skipped = int(gather_uneven(torch.tensor([skipped], device=device)).sum().item())
    ids = dict(gather_objects(image_ids))
    bad = sorted(gather_objects(list(bad_parts or [])))
    if key.numel() == 0:
        unreadable = f"; unreadable: {'; '.join(bad[:3])}" if bad else ""
        raise DataError(f"no readable image in the dataset (skipped {skipped}{unreadable})")
    order = torch.argsort(key, stable=True)
    key, image, label, index = key[order], image[order], label[order], index[order]
    keep = torch.ones_like(key, dtype=torch.bool)
    keep[1:] = key[1:] != key[:-1]  # an item read twice counts once
    if not bool(keep.all()):
        log.warning("dropped %d duplicate rows while gathering", int((~keep).sum()))
    key, image, label, index = key[keep], image[keep], label[keep], index[keep]
    text = text_item = None
    if with_text:
        text = gather_uneven(_cat(parts["text"], no_rows)).cpu()
        owner = gather_uneven(_cat(parts["owner"], no_ids)).cpu()
        pos = gather_uneven(_cat(parts["pos"], no_ids)).cpu()
        # sort captions by (owner key, position); drop repeats
        order = torch.argsort(pos, stable=True)
        order = order[torch.argsort(owner[order], stable=True)]
        text, owner, pos = text[order], owner[order], pos[order]
        first = torch.ones_like(owner, dtype=torch.bool)
        first[1:] = (owner[1:] != owner[:-1]) | (pos[1:] != pos[:-1])
        text, owner = text[first], owner[first]
        text_item = torch.searchsorted(key, owner)
    return Features(
        image, key, label, [ids[k] for k in key.tolist()], text, text_item, skipped, index, bad
    )
