"""Embedding a shard folder with a CLIP model: every sample once, in index order.

Unlike the training stream, nothing is shuffled or dropped: each process reads its slice of
the shards (``shards[rank::world]``), and the embeddings are gathered and sorted by dataset
index, so the result is the same on any number of processes.
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from PIL import Image
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from tqdm.auto import tqdm

from data_pipelines.shards import IMAGE_EXTENSIONS, ShardSet, iter_tar_samples


@dataclass
class Encoded:
    image: torch.Tensor  # [n, d] normalised
    text: torch.Tensor  # [n, d] normalised
    index: torch.Tensor  # [n]
    label: torch.Tensor  # [n] (-1: none)
    image_id: list[str]  # samples with one image_id share an image (several captions)
    skipped: int


class _EvalShards(IterableDataset):
    def __init__(self, paths: list[str], transform: Callable, tokenize: Callable):
        super().__init__()
        self.paths, self.transform, self.tokenize = paths, transform, tokenize

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        paths = self.paths if info is None else self.paths[info.id :: info.num_workers]
        for path in paths:
            for s in iter_tar_samples(path):
                ext = next((e for e in IMAGE_EXTENSIONS if e in s), None)
                caption = s.get("txt", b"").decode("utf-8", errors="replace").strip()
                try:
                    meta = json.loads(s["json"]) if "json" in s else {}
                    index = int(meta.get("index", s["__key__"]))
                    with Image.open(io.BytesIO(s[ext])) as im:
                        image = self.transform(im.convert("RGB"))
                except Exception:
                    yield {"bad": True}
                    continue
                if not caption:
                    yield {"bad": True}
                    continue
                label = meta.get("label", -1)
                yield {
                    "bad": False,
                    "image": image,
                    "text": self.tokenize([caption])[0],
                    "index": index,
                    "label": label if isinstance(label, int) else -1,
                    "image_id": str(meta.get("image_id", index)),
                }


def _collate(items: list[dict]) -> dict:
    good = [i for i in items if not i["bad"]]
    out = {"skipped": len(items) - len(good), "n": len(good)}
    if good:
        out["image"] = torch.stack([g["image"] for g in good])
        out["text"] = torch.stack([g["text"] for g in good])
        out["index"] = torch.tensor([g["index"] for g in good])
        out["label"] = torch.tensor([g["label"] for g in good])
        out["image_id"] = [g["image_id"] for g in good]
    return out


@torch.no_grad()
def encode_shards(
    model: torch.nn.Module,
    shard_set: ShardSet,
    transform: Callable,
    tokenize: Callable,
    *,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str = "cpu",
    rank: int = 0,
    world: int = 1,
    progress: bool = True,
) -> Encoded:
    """Normalised image and text embeddings of this rank's slice of ``shard_set``."""
    model.eval()
    paths = [s.path for s in shard_set.shards][rank::world]
    ds = _EvalShards(paths, transform, tokenize)
    loader = DataLoader(ds, batch_size=batch_size, num_workers=min(num_workers, len(paths)),
                        collate_fn=_collate)
    total = sum(s.num_samples for s in shard_set.shards[rank::world]) if world == 1 else None
    parts: dict[str, list] = {"image": [], "text": [], "index": [], "label": [], "image_id": []}
    skipped = 0
    bar = tqdm(total=total, desc="encoding", unit="sample", disable=not progress)
    for batch in loader:
        skipped += batch["skipped"]
        bar.update(batch["n"] + batch["skipped"])
        if not batch["n"]:
            continue
        img = model.encode_image(batch["image"].to(device), normalize=True)
        txt = model.encode_text(batch["text"].to(device), normalize=True)
        parts["image"].append(img.float().cpu())
        parts["text"].append(txt.float().cpu())
        parts["index"].append(batch["index"])
        parts["label"].append(batch["label"])
        parts["image_id"].extend(batch["image_id"])
    bar.close()
    if not parts["index"]:
        raise RuntimeError(f"no usable sample in {shard_set.root} (skipped {skipped})")
    return Encoded(
        image=torch.cat(parts["image"]),
        text=torch.cat(parts["text"]),
        index=torch.cat(parts["index"]),
        label=torch.cat(parts["label"]),
        image_id=parts["image_id"],
        skipped=skipped,
    )
