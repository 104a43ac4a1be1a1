"""Evaluation metrics on hand-made embeddings whose answers are known (no model involved)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from clipfnd_eval.knn import knn_classify, knn_metrics
from clipfnd_eval.linear_probe import linear_probe
from clipfnd_eval.retrieval import (
    caption_matches,
    duplicate_captions,
    first_positive_rank,
    grouped_retrieval_metrics,
    retrieval_metrics,
)
from clipfnd_eval.zeroshot import as_callable, class_embeddings, classification_metrics


def unit(*rows: list[float]) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.tensor(rows, dtype=torch.float32), dim=-1)


# --- retrieval -------------------------------------------------------------------------------
def test_retrieval_one_caption_each_known_ranks():
    image = torch.eye(3)
    # caption 0 -> image 0 first; caption 1 ranks image 1 second; caption 2 ranks image 2 third
    text = unit([1, 0, 0], [0.9, 0.5, 0], [0.2, 0.9, 0.1])
    m = retrieval_metrics(image, text, torch.tensor([0, 1, 2]))
    assert m["t2i_R@1"] == pytest.approx(1 / 3)
    assert m["t2i_mean_rank"] == pytest.approx((1 + 2 + 3) / 3)
    assert m["t2i_median_rank"] == 2
    assert m["t2i_R@5"] == 1.0
    # image 0 -> caption 0 first; image 1 -> captions [2, 1, 0]: rank 2; image 2 -> caption 2 first
    assert m["i2t_R@1"] == pytest.approx(2 / 3)
    assert m["i2t_mean_rank"] == pytest.approx((1 + 2 + 1) / 3)


def test_retrieval_exact_ties_count_against_the_query():
    """Four images whose captions are different texts with identical embeddings (texts are
    all different when no strings are given): every image ties with three captions.
    Pessimistic ranking puts the two wrong ones first, so no image->text query among them is
    a hit at R@1 (counting ties for the query would give 1.0)."""
    image = unit([1, 0, 0], [0.9, 0.1, 0], [0.8, 0.2, 0], [0, 0, 1])
    text = unit([1, 0, 0], [1, 0, 0], [1, 0, 0], [0, 0, 1])  # captions 0-2 identical
    m = retrieval_metrics(image, text, torch.tensor([0, 1, 2, 3]))
    # images 0-2: the three identical captions tie; each ranks its own after the other two
    assert m["i2t_R@1"] == pytest.approx(1 / 4)  # only image 3's caption is unique
    assert m["i2t_R@5"] == 1.0
    assert m["i2t_mean_rank"] == pytest.approx((3 + 3 + 3 + 1) / 4)
    # caption -> image is tie-free here (the three images differ): caption 0 finds image 0 first
    assert m["t2i_R@1"] == pytest.approx(2 / 4)
    ranks = first_positive_rank(
        torch.tensor([[0.5, 0.5, 0.5]]), torch.tensor([[False, True, False]])
    )
    assert ranks.tolist() == [2]  # both tied wrong candidates come first
    # the same with strings: distinct texts keep pessimistic ties ...
    distinct = ["a dog", "A dog", "a dog.", "a cat"]
    assert retrieval_metrics(image, text, torch.tensor([0, 1, 2, 3]), captions=distinct) == m
    # ... one text written for three images matches each of them
    same = ["a dog", "a dog", "a dog", "a cat"]
    m = retrieval_metrics(image, text, torch.tensor([0, 1, 2, 3]), captions=same)
    assert m["i2t_R@1"] == 1.0 and m["i2t_mean_rank"] == 1.0
    assert m["t2i_R@1"] == 1.0  # caption 1 ("a dog") finds image 0 first: a true match too


def reference_ranks(image, text, text_to_image, captions):
    """The rule written out in float64 loops: a caption matches an image when its text is one
    of the image's captions; a rank counts the non-matching candidates scoring at least as
    high as the best match (0-based). Returns (t2i ranks, i2t ranks)."""
    s = text.double() @ image.double().T
    texts_of = [set() for _ in range(image.shape[0])]
    for j, i in enumerate(text_to_image.tolist()):
        texts_of[i].add(captions[j])

    def rank(scores: list[float], match: list[bool]) -> int:
        best = max(x for x, m in zip(scores, match, strict=True) if m)
        return sum(1 for x, m in zip(scores, match, strict=True) if not m and x >= best)

    images, texts = range(image.shape[0]), range(text.shape[0])
    t2i = [
        rank([float(s[j, i]) for i in images], [captions[j] in texts_of[i] for i in images])
        for j in texts
    ]
    i2t = [
        rank([float(s[j, i]) for j in texts], [captions[j] in texts_of[i] for j in texts])
        for i in images
    ]
    return t2i, i2t


def summary(ranks: list[int], prefix: str) -> dict[str, float]:
    out = {f"{prefix}R@{k}": sum(r < k for r in ranks) / len(ranks) for k in (1, 5, 10)}
    one_based = sorted(r + 1 for r in ranks)
    out[f"{prefix}mean_rank"] = sum(one_based) / len(ranks)
    out[f"{prefix}median_rank"] = float(one_based[(len(ranks) - 1) // 2])  # torch's lower median
    return out


def test_retrieval_shared_caption_texts_equal_a_float64_loop():
    """30 images, 45 captions drawn from 10 texts (texts 8 and 9 differ but share an
    embedding). Small integer vectors: float32 scores are exact, so ties are real ties."""
    gen = torch.Generator().manual_seed(0)
    table = torch.randint(-3, 4, (10, 4), generator=gen).float()
    table[9] = table[8]
    words = [f"text {t}" for t in range(10)]
    text_to_image = torch.cat([torch.arange(30), torch.randint(0, 30, (15,), generator=gen)])
    which = torch.randint(0, 10, (45,), generator=gen)
    # an image looks like its first caption, give or take
    image = 2 * table[which[:30]] + torch.randint(-2, 3, (30, 4), generator=gen).float()
    captions = [words[t] for t in which.tolist()]
    got = retrieval_metrics(image, table[which], text_to_image, captions=captions)
    t2i, i2t = reference_ranks(image, table[which], text_to_image, captions)
    scores, pos = table[which] @ image.T, caption_matches(text_to_image, 30, captions)
    assert first_positive_rank(scores, pos).tolist() == t2i
    assert first_positive_rank(scores.T, pos.T).tolist() == i2t
    want = {**summary(t2i, "t2i_"), **summary(i2t, "i2t_")}
    for k, v in want.items():  # means of float32 values
        assert got[k] == pytest.approx(v, rel=1e-6), k
    assert 0 < want["i2t_R@1"] < 1 and 0 < want["t2i_R@1"] < 1, want


def test_one_caption_text_for_many_images_perfect_model_and_clip_benchmark():
    """400 images of 24 classes, each captioned "a photo of a CLASS" (24 distinct texts), and a
    model that embeds an image and its caption identically. Every retrieved caption of the
    image's text is right: R@1 is 1.0 both ways. clip_benchmark's figure (own caption only,
    topk's order among the 16-17 tied captions) is its own function's on the same scores."""
    from clip_benchmark.metrics.zeroshot_retrieval import batchify, recall_at_k

    label = torch.arange(400) % 24
    image = torch.eye(24)[label]
    text = torch.eye(24)[label]
    captions = [f"a photo of a class {c}" for c in label.tolist()]
    m = retrieval_metrics(image, text, torch.arange(400), captions=captions)
    for direction in ("i2t", "t2i"):
        assert [m[f"{direction}_R@{k}"] for k in (1, 5, 10)] == [1.0, 1.0, 1.0]
        assert m[f"{direction}_mean_rank"] == m[f"{direction}_median_rank"] == 1.0
    assert duplicate_captions(captions) == {"texts": 24, "captions": 400}
    scores = text @ image.T
    own = torch.eye(400, dtype=torch.bool)
    for k in (1, 5, 10):
        for key, s, p in (("t2i", scores, own), ("i2t", scores.T, own.T)):
            theirs = (batchify(recall_at_k, s, p, 64, "cpu", k=k) > 0).float().mean().item()
            assert m[f"{key}_R@{k}_clip_benchmark"] == theirs, (key, k)
    assert m["i2t_R@1_clip_benchmark"] < 0.1  # its tie-break finds the own caption rarely


def test_retrieval_several_captions_per_image_best_caption_counts():
    image = torch.eye(2)
    # image 0 has captions 0 and 1, image 1 has caption 2
    text = unit([0, 1], [1, 0.1], [0.1, 1])
    t2i = torch.tensor([0, 0, 1])
    m = retrieval_metrics(image, text, t2i)
    # image 0: captions by score 1 (0.995), 2 (0.0995), 0 (0): its caption 1 comes first;
    # image 1: captions 0 (1.0), 2 (0.995): its caption comes second
    assert m["i2t_R@1"] == 0.5
    assert m["i2t_mean_rank"] == 1.5
    # caption 0 is closer to image 1 -> rank 2; captions 1 and 2 rank their image first
    assert m["t2i_R@1"] == pytest.approx(2 / 3)
    assert m["t2i_mean_rank"] == pytest.approx(4 / 3)


def test_grouped_retrieval_pools_captions_and_drops_captionless_images():
    # four items: items 0 and 1 show the same image "a"; item 3 has no caption
    image = unit([1, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1])
    image_id = ["a", "a", "b", "c"]
    text = unit([0, 1, 0], [1, 0, 0], [0, 1, 0.2])
    text_item = torch.tensor([0, 1, 2])  # caption 0 belongs to "a" but looks like "b"
    m, counts = grouped_retrieval_metrics(image, image_id, text, text_item)
    assert counts == {"images": 2, "texts": 3, "images_without_caption": 1}
    captions = ["a square", "a circle", "a square"]  # "a" and "b" share the text "a square"
    shared, counts = grouped_retrieval_metrics(image, image_id, text, text_item, captions=captions)
    assert counts["duplicate_captions"] == {"texts": 1, "captions": 2}
    assert shared["i2t_R@1"] == 1.0  # "b" now finds a caption of its own text first
    assert shared["t2i_R@1"] == 1.0  # caption 0 finds "b", which has its text
    assert m["i2t_R@1"] == 0.5  # "a" finds caption 1 first; "b" finds caption 0 before 2
    assert m["i2t_R@5"] == 1.0
    assert m["t2i_R@1"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="captions"):
        grouped_retrieval_metrics(image, image_id, torch.zeros(0, 3), torch.zeros(0).long())


# --- zero-shot -------------------------------------------------------------------------------
def test_classification_metrics_known_answers():
    # 6 samples, 6 classes; scores rank the true class 1st, 1st, 3rd, 6th, 1st, 2nd
    scores = torch.tensor(
        [
            [9, 1, 2, 3, 4, 5],
            [1, 9, 2, 3, 4, 5],
            [7, 8, 6, 3, 4, 5],
            [9, 8, 7, 6, 5, 1],
            [1, 2, 3, 4, 5, 9],
            [1, 2, 3, 4, 8, 9],
        ],
        dtype=torch.float32,
    )
    labels = torch.tensor([0, 1, 2, 5, 5, 4])
    m = classification_metrics(scores, labels)
    assert m["top1"] == pytest.approx(3 / 6)
    assert m["top5"] == pytest.approx(5 / 6)
    # recalls: class 0: 1, class 1: 1, class 2: 0, class 4: 0, class 5: 1/2 -> mean 0.5
    assert m["mean_per_class_recall"] == pytest.approx((1 + 1 + 0 + 0 + 0.5) / 5)
    with pytest.raises(ValueError, match="outside"):
        classification_metrics(scores, torch.tensor([0, 1, 2, 3, 4, 6]))


class FakeTextModel(torch.nn.Module):
    """encode_text of a 'token' tensor: a fixed random embedding per distinct first token."""

    def __init__(self, dim: int = 8):
        super().__init__()
        self.table = torch.nn.Embedding(1000, dim)
        torch.nn.init.normal_(self.table.weight, generator=torch.Generator().manual_seed(0))

    def encode_text(self, tokens: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        x = self.table(tokens).sum(1)
        return torch.nn.functional.normalize(x, dim=-1) if normalize else x


def fake_tokenizer(texts: list[str]) -> torch.Tensor:
    return torch.tensor(
        [
            [sum(map(ord, w)) % 1000 for w in t.split()[:3]] + [0] * (3 - len(t.split()[:3]))
            for t in texts
        ]
    )


def test_class_embeddings_are_the_prompt_ensemble_of_methods_md():
    model = FakeTextModel()
    classnames = ["cat", "dog", "red bird"]
    templates = ["a {c}", "the {}", "{c} here"]
    got = class_embeddings(model, fake_tokenizer, classnames, templates)
    for i, name in enumerate(classnames):  # the formula, written out naively
        per_template = []
        for t in templates:
            e = model.encode_text(fake_tokenizer([as_callable(t)(name)]))[0]
            per_template.append(e / e.norm())
        mean = torch.stack(per_template).mean(0)
        assert torch.allclose(got[i], mean / mean.norm(), atol=1e-6)
    with pytest.raises(ValueError, match="no"):
        as_callable("a photo without a slot")


# --- kNN -------------------------------------------------------------------------------------
def test_knn_matches_naive_weighted_vote():
    gen = torch.Generator().manual_seed(0)
    train = torch.nn.functional.normalize(torch.randn(60, 5, generator=gen), dim=-1)
    labels = torch.randint(0, 4, (60,), generator=gen)
    test = torch.nn.functional.normalize(torch.randn(25, 5, generator=gen), dim=-1)
    pred = knn_classify(train, labels, test, k=20, temperature=0.07)
    for q in range(test.shape[0]):
        sims = [(float(test[q] @ train[i]), int(labels[i])) for i in range(train.shape[0])]
        sims.sort(key=lambda s: -s[0])
        votes = [0.0] * 4
        for s, lab in sims[:20]:
            votes[lab] += math.exp(s / 0.07)
        assert pred[q] == int(np.argmax(votes))


def test_knn_top1_known_answer():
    train = unit([1, 0], [0.9, 0.1], [0, 1], [0.1, 0.9])
    labels = torch.tensor([0, 0, 1, 1])
    test = unit([1, 0.2], [0.2, 1], [0.95, 0.05])
    m = knn_metrics(train, labels, test, torch.tensor([0, 1, 1]), k=3)
    assert m["top1"] == pytest.approx(2 / 3)


# --- linear probe ----------------------------------------------------------------------------
def test_linear_probe_separable_classes():
    gen = torch.Generator().manual_seed(0)
    centres = torch.nn.functional.normalize(torch.randn(3, 16, generator=gen), dim=-1) * 4

    def sample(n):
        y = torch.arange(n) % 3
        return centres[y] + 0.3 * torch.randn(n, 16, generator=gen), y

    x, y = sample(90)
    xt, yt = sample(30)
    m = linear_probe(x, y, xt, yt, cs=(0.01, 1.0, 100.0))
    assert m["top1"] == 1.0
    assert m["C"] in (0.01, 1.0, 100.0)
    assert 0.0 <= m["val_top1"] <= 1.0
    with pytest.raises(ValueError, match="two classes"):
        linear_probe(x, torch.zeros(90, dtype=torch.long), xt, yt)
