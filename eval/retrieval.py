"""Image-text retrieval metrics (docs/methods.md, "Evaluation definitions").

Recall@K is the share of queries with at least one true match among the top K; mean and
median rank are of the best-ranked true match (1 = first). An image may have several
captions: its true matches are all of them, and each caption's true match is its image.

Ties are ranked pessimistically: a wrong candidate that scores exactly as high as the best true
match is ranked before it. Exact ties are common with duplicate captions (identical texts
give identical embeddings); ranking them in the query's favour would count a query whose
caption is shared by many images as a hit at R@1 for every one of those images.
"""

from __future__ import annotations

import torch

from clipfnd.errors import UserError


def first_positive_rank(
    scores: torch.Tensor, positives: torch.Tensor, chunk: int = 1024
) -> torch.Tensor:
    """0-based rank of each query's best-scoring positive: the number of non-positives that
    score at least as high (ties count against the query). ``[Q, G]`` scores and bool mask."""
    if not bool(positives.any(1).all()):
        raise UserError("every query needs at least one positive in the gallery")
    ranks = []
    for start in range(0, scores.shape[0], chunk):
        s = scores[start : start + chunk]
        p = positives[start : start + chunk]
        best = s.masked_fill(~p, float("-inf")).max(1).values
        ranks.append(((s >= best[:, None]) & ~p).sum(1))
    return torch.cat(ranks)


def rank_metrics(ranks: torch.Tensor, prefix: str, ks=(1, 5, 10)) -> dict[str, float]:
    out = {f"{prefix}R@{k}": (ranks < k).float().mean().item() for k in ks}
    one_based = (ranks + 1).float()
    out[f"{prefix}mean_rank"] = one_based.mean().item()
    out[f"{prefix}median_rank"] = one_based.median().item()
    return out


def retrieval_metrics(
    image: torch.Tensor,
    text: torch.Tensor,
    text_to_image: torch.Tensor,
    ks=(1, 5, 10),
    prefix: str = "",
) -> dict[str, float]:
    """Both directions from normalised embeddings.

    Args:
        image: ``[I, d]``; text: ``[T, d]``; text_to_image: ``[T]`` the image of each caption.
    """
    scores = text @ image.T  # [T, I]
    t2i_pos = torch.zeros_like(scores, dtype=torch.bool)
    t2i_pos[torch.arange(text.shape[0]), text_to_image] = True
    out = rank_metrics(first_positive_rank(scores, t2i_pos), f"{prefix}t2i_", ks)
    out.update(rank_metrics(first_positive_rank(scores.T, t2i_pos.T), f"{prefix}i2t_", ks))
    return out


def group_images(image_ids: list[str]) -> tuple[torch.Tensor, list[int]]:
    """``text_to_image`` and the first sample of each distinct image, from per-sample ids."""
    first: dict[str, int] = {}
    t2i = []
    rows = []
    for i, key in enumerate(image_ids):
        if key not in first:
            first[key] = len(rows)
            rows.append(i)
        t2i.append(first[key])
    return torch.tensor(t2i), rows


def label_retrieval_metrics(
    image: torch.Tensor, text: torch.Tensor, label: torch.Tensor, ks=(1, 5, 10)
) -> dict[str, float]:
    """Retrieval where any sample of the same label counts as a match (concept level)."""
    scores = text @ image.T
    pos = label[:, None] == label[None, :]
    out = rank_metrics(first_positive_rank(scores, pos), "label_t2i_", ks)
    out.update(rank_metrics(first_positive_rank(scores.T, pos.T), "label_i2t_", ks))
    return out


def grouped_retrieval_metrics(
    image: torch.Tensor,
    image_id: list[str],
    text: torch.Tensor,
    text_item: torch.Tensor,
    ks=(1, 5, 10),
) -> tuple[dict[str, float], dict[str, int]]:
    """Retrieval over distinct images, from per-item embeddings and captions.

    Items with the same ``image_id`` are one image (its first item's embedding is used) and
    pool their captions; ``text_item[j]`` is the item of caption ``j``. Images without any
    caption cannot be image->text queries and are left out of the gallery (counted).

    Returns the metrics and the counts ``{"images", "texts", "images_without_caption"}``.
    """
    if text.shape[0] == 0:
        raise UserError("retrieval needs captions, and the data has none")
    item_to_image, rows = group_images(image_id)
    caption_image = item_to_image[text_item]
    has_caption = torch.zeros(len(rows), dtype=torch.bool)
    has_caption[caption_image] = True
    new_index = torch.cumsum(has_caption.long(), 0) - 1
    gallery = image[torch.tensor(rows)][has_caption]
    metrics = retrieval_metrics(gallery, text, new_index[caption_image], ks)
    counts = {
        "images": int(gallery.shape[0]),
        "texts": int(text.shape[0]),
        "images_without_caption": int((~has_caption).sum()),
    }
    return metrics, counts
