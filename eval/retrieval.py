"""Image-text retrieval metrics (docs/methods.md, "Evaluation definitions").

Recall@K is the share of queries with at least one true match among the top K; mean and
median rank are of the best-ranked true match (1 = first). An image may have several
captions, and several images may share a caption text ("a photo of a dog"): a caption and an
image match when the caption's text is one of the image's captions. So an image's true
matches are its captions and every caption with the same text, and a caption's true matches
are its image and every other image that text was written for. Texts are compared as strings
(identical texts also have identical embeddings, up to the last bits between batches).

Ties are ranked pessimistically: a wrong candidate that scores exactly as high as the best true
match is ranked before it. Exact ties between different texts are rare; ranking them in the
query's favour would flatter a model that maps different texts to one embedding.

clip_benchmark's figure is kept under its own keys (``i2t_R@K_clip_benchmark``,
``t2i_R@K_clip_benchmark``): a caption matches its own image only, and the order among equal
scores is that of ``torch.topk``, as in its ``recall_at_k``.
"""

from __future__ import annotations

from collections import Counter

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


def topk_hits(
    scores: torch.Tensor, positives: torch.Tensor, k: int, chunk: int = 1024
) -> torch.Tensor:
    """Whether a positive is among each query's ``torch.topk(scores, k)`` indices: the hits of
    clip_benchmark's ``recall_at_k`` (whose ``nb_true_positive > 0``), ties in topk's order."""
    k = min(k, scores.shape[1])
    hits = []
    for start in range(0, scores.shape[0], chunk):
        top = torch.topk(scores[start : start + chunk], k, dim=1).indices
        hits.append(positives[start : start + chunk].gather(1, top).any(1))
    return torch.cat(hits)


def rank_metrics(ranks: torch.Tensor, prefix: str, ks=(1, 5, 10)) -> dict[str, float]:
    out = {f"{prefix}R@{k}": (ranks < k).float().mean().item() for k in ks}
    one_based = (ranks + 1).float()
    out[f"{prefix}mean_rank"] = one_based.mean().item()
    out[f"{prefix}median_rank"] = one_based.median().item()
    return out


def caption_matches(
    text_to_image: torch.Tensor, num_images: int, captions: list[str] | None = None
) -> torch.Tensor:
    """``[T, I]``: caption ``j`` matches image ``i`` when its text is one of image ``i``'s
    captions (``captions``: the text of each caption; None: all texts differ)."""
    ids: dict[str | int, int] = {}
    texts = range(text_to_image.shape[0]) if captions is None else captions
    text_id = torch.tensor([ids.setdefault(t, len(ids)) for t in texts], dtype=torch.long)
    written_for = torch.zeros((len(ids), num_images), dtype=torch.bool)
    written_for[text_id, text_to_image] = True  # [distinct texts, I]
    return written_for[text_id]


def duplicate_captions(captions: list[str]) -> dict[str, int]:
    """How many caption texts occur more than once, and how many captions have one of them."""
    counts = Counter(captions).values()
    return {"texts": sum(c > 1 for c in counts), "captions": sum(c for c in counts if c > 1)}


def retrieval_metrics(
    image: torch.Tensor,
    text: torch.Tensor,
    text_to_image: torch.Tensor,
    ks=(1, 5, 10),
    prefix: str = "",
    captions: list[str] | None = None,
) -> dict[str, float]:
    """Both directions from normalised embeddings, and clip_benchmark's Recall@K.

    Args:
        image: ``[I, d]``; text: ``[T, d]``; text_to_image: ``[T]`` the image of each caption;
        captions: the text of each caption (None: all texts differ).
    """
    scores = text @ image.T  # [T, I]
    pos = caption_matches(text_to_image, image.shape[0], captions)
    out = rank_metrics(first_positive_rank(scores, pos), f"{prefix}t2i_", ks)
    out.update(rank_metrics(first_positive_rank(scores.T, pos.T), f"{prefix}i2t_", ks))
    own = torch.zeros_like(scores, dtype=torch.bool)
    own[torch.arange(text.shape[0]), text_to_image] = True
    for k in ks:
        t2i, i2t = topk_hits(scores, own, k), topk_hits(scores.T, own.T, k)
        out[f"{prefix}t2i_R@{k}_clip_benchmark"] = t2i.float().mean().item()
        out[f"{prefix}i2t_R@{k}_clip_benchmark"] = i2t.float().mean().item()
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
    captions: list[str] | None = None,
) -> tuple[dict[str, float], dict]:
    """Retrieval over distinct images, from per-item embeddings and captions.

    Items with the same ``image_id`` are one image (its first item's embedding is used) and
    pool their captions; ``text_item[j]`` is the item of caption ``j`` and ``captions[j]`` its
    text. Images without any caption cannot be image->text queries and are left out of the
    gallery (counted).

    Returns the metrics and the counts ``{"images", "texts", "images_without_caption"}``, with
    ``"duplicate_captions"`` (see :func:`duplicate_captions`) when ``captions`` are given.
    """
    if text.shape[0] == 0:
        raise UserError("retrieval needs captions, and the data has none")
    item_to_image, rows = group_images(image_id)
    caption_image = item_to_image[text_item]
    has_caption = torch.zeros(len(rows), dtype=torch.bool)
    has_caption[caption_image] = True
    new_index = torch.cumsum(has_caption.long(), 0) - 1
    gallery = image[torch.tensor(rows)][has_caption]
    metrics = retrieval_metrics(gallery, text, new_index[caption_image], ks, captions=captions)
    counts = {
        "images": int(gallery.shape[0]),
        "texts": int(text.shape[0]),
        "images_without_caption": int((~has_caption).sum()),
    }
    if captions is not None:
        counts["duplicate_captions"] = duplicate_captions(captions)
    return metrics, counts
