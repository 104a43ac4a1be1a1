"""Embedding an evaluation dataset: every item once, batched, gathered, in dataset order.

Each process reads its slice of the dataset (and each DataLoader worker a slice of that, see
:meth:`eval.datasets.EvalDataset.iter_slice`), encodes images (and captions, when asked) under
``torch.no_grad``, and the rows of all processes are gathered, sorted by item key and
de-duplicated. The result is the same on any number of processes and workers.

An image that cannot be decoded is skipped and counted; the first few (in dataset order) are
named with the reason in one warning on the main process and in ``Features.skipped_examples``.
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
from data_pipelines.loader.batcher import worker_message
from data_pipelines.loader.worker import share_from_worker
from data_pipelines.progress import bar_disable

from .datasets import KEY_SHIFT, BadPart, EvalDataset
from .processes import Processes

log = logging.getLogger(__name__)

NUM_EXAMPLES = 5  # unreadable images named in the results (the warning names 3)


@dataclass
class Features:
    """Normalised embeddings of a dataset's items, sorted by key.

    ``text[j]`` is the embedding of caption ``captions[j]`` of item ``text_item[j]`` (a row of
    ``image``).
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
    captions: list[str] | None = None  # [M] the text of each caption
    # the first unreadable images in dataset order: {"item": name, "reason": "Type: message"}
    skipped_examples: list[dict[str, str]] = field(default_factory=list)

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
            except Exception as e:  # unreadable image: counted and named, not fatal
                name = self.dataset.item_name(key >> KEY_SHIFT, item)
                reason = f"{type(e).__name__}: {' '.join(str(e).split())}"  # on one line
                yield {"bad": True, "unreadable": (key, name, reason)}
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
                out["captions"] = item.captions
            yield out


def _collate(items: list[dict]) -> dict:
    good = [i for i in items if not i["bad"]]
    parts = [i["bad_part"] for i in items if "bad_part" in i]
    unreadable = [i["unreadable"] for i in items if "unreadable" in i]
    out = {"skipped": len(unreadable), "n": len(good), "bad_parts": parts, "unreadable": unreadable}
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
        out["captions"] = [c for g in good for c in g["captions"]]
    if get_worker_info() is not None:  # a failure to share is raised, not a hang
        share_from_worker([v for v in out.values() if torch.is_tensor(v)], "evaluation worker")
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
    captions: list[tuple[int, int, str]] = []  # (owner key, position, text)
    unreadable: list[tuple[int, str, str]] = []  # the first few: (key, name, reason)
    skipped = 0
    bad_parts: list[str] = []
    total = None
    if dataset.num_items is not None:
        total = (dataset.num_items + processes.world - 1) // processes.world
    bar = tqdm(
        total=total, desc=desc, unit="image", disable=bar_disable(progress and processes.is_main)
    )
    for batch in _unwrapped(loader):
        skipped += batch["skipped"]
        unreadable = sorted(unreadable + batch["unreadable"])[:NUM_EXAMPLES]
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
            captions.extend(
                zip(
                    batch["text_owner"].tolist(),
                    batch["text_position"].tolist(),
                    batch["captions"],
                    strict=True,
                )
            )
    bar.close()
    feats = _gather_sorted(
        parts,
        image_ids,
        (skipped, unreadable),
        device,
        captions if tokenize is not None else None,
        bad_parts=bad_parts,
    )
    if feats.skipped and processes.is_main:
        log.warning(
            "%s: skipped %d of %d images that could not be read, e.g. %s",
            desc,
            feats.skipped,
            feats.skipped + feats.num_items,
            _examples(feats.skipped_examples[:3]),
        )
    return feats


def _examples(examples: list[dict[str, str]]) -> str:
    """``A, B: reason; C: other reason``: the items named once per reason."""
    by_reason: dict[str, list[str]] = {}
    for e in examples:
        by_reason.setdefault(e["reason"], []).append(e["item"])
    return "; ".join(f"{', '.join(items)}: {reason}" for reason, items in by_reason.items())


def _unwrapped(loader: DataLoader) -> Iterator[dict]:
    """The loader's batches; a ``DataError`` raised in a worker keeps its one-line message
    (the DataLoader would wrap it in the worker's traceback)."""
    try:
        yield from loader
    except DataError as e:
        raise DataError(worker_message(e)) from None


def _cat(chunks: list[torch.Tensor], empty: torch.Tensor) -> torch.Tensor:
    return torch.cat(chunks) if chunks else empty


def _gather_sorted(
    parts: dict[str, list],
    image_ids: list[tuple[int, str]],
    skips: tuple[int, list[tuple[int, str, str]]],
    device: torch.device,
    captions: list[tuple[int, int, str]] | None,
    bad_parts: list[str] | None = None,
) -> Features:
    """Every process's rows, sorted by item key, each item once. ``skips``: this process's
    count of unreadable images and its first few; ``captions``: (owner key, position, text)
    of each caption encoded here (None: no captions)."""
    skipped, unreadable = skips
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
    examples = [
        {"item": name, "reason": reason}
        for _, name, reason in sorted(gather_objects(unreadable))[:NUM_EXAMPLES]
    ]
    if key.numel() == 0:
        why = f", e.g. {_examples(examples[:3])}" if examples else ""
        parts_note = f"; unreadable: {'; '.join(bad[:3])}" if bad else ""
        raise DataError(f"no readable image in the dataset (skipped {skipped}{why}{parts_note})")
    order = torch.argsort(key, stable=True)
    key, image, label, index = key[order], image[order], label[order], index[order]
    keep = torch.ones_like(key, dtype=torch.bool)
    keep[1:] = key[1:] != key[:-1]  # an item read twice counts once
    if not bool(keep.all()):
        log.warning("dropped %d duplicate rows while gathering", int((~keep).sum()))
    key, image, label, index = key[keep], image[keep], label[keep], index[keep]
    text = text_item = texts = None
    if captions is not None:
        text_of = {(o, p): t for o, p, t in gather_objects(captions)}
        text = gather_uneven(_cat(parts["text"], no_rows)).cpu()
        owner = gather_uneven(_cat(parts["owner"], no_ids)).cpu()
        pos = gather_uneven(_cat(parts["pos"], no_ids)).cpu()
        # sort captions by (owner key, position); drop repeats
        order = torch.argsort(pos, stable=True)
        order = order[torch.argsort(owner[order], stable=True)]
        text, owner, pos = text[order], owner[order], pos[order]
        first = torch.ones_like(owner, dtype=torch.bool)
        first[1:] = (owner[1:] != owner[:-1]) | (pos[1:] != pos[:-1])
        text, owner, pos = text[first], owner[first], pos[first]
        text_item = torch.searchsorted(key, owner)
        texts = [text_of[o, p] for o, p in zip(owner.tolist(), pos.tolist(), strict=True)]
    return Features(
        image,
        key,
        label,
        [ids[k] for k in key.tolist()],
        text,
        text_item,
        skipped,
        index,
        bad,
        texts,
        examples,
    )
