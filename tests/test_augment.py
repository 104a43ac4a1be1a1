"""SimCLR's two-view augmentation: shapes, randomness where it belongs, and the same views
under the same seed (what makes the loader's per-sample seeding exact)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from data_pipelines.augment import TwoViews, simclr_augment


def picture(size: int = 32) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8))


@pytest.mark.parametrize("size", [32, 96])
def test_two_views_shape_and_difference(size):
    views = TwoViews(simclr_augment(size))(picture(48))
    assert views.shape == (2, 3, size, size) and views.dtype == torch.float32
    assert not torch.equal(views[0], views[1])  # two independent draws


def test_same_seed_same_views_other_seed_other_views():
    make = TwoViews(simclr_augment(32, strength=0.5))
    torch.manual_seed(7)
    a = make(picture())
    torch.manual_seed(7)
    b = make(picture())
    torch.manual_seed(8)
    c = make(picture())
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_no_augmentation_left_is_normalisation_only():
    """With a full-image crop, no jitter and no blur, what is left is a possible flip or
    grayscale of the normalised image: each view is one of four exact images."""
    img = picture(32)
    plain = simclr_augment(32, strength=0.0, scale=(1.0, 1.0), blur=False)
    base = torch.from_numpy(np.array(img)).permute(2, 0, 1).float() / 255
    mean, std = (
        torch.tensor([0.485, 0.456, 0.406])[:, None, None],
        torch.tensor([0.229, 0.224, 0.225])[:, None, None],
    )
    gray = (0.2989 * base[0] + 0.587 * base[1] + 0.114 * base[2]).expand(3, -1, -1)
    candidates = [(x - mean) / std for x in (base, base.flip(-1), gray, gray.flip(-1))]
    for seed in range(12):
        torch.manual_seed(seed)
        out = plain(img)
        assert any(torch.allclose(out, c, atol=2e-2) for c in candidates), seed


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="size"):
        simclr_augment(4)
    with pytest.raises(ValueError, match="strength"):
        simclr_augment(32, strength=-1)
