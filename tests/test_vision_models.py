"""Vision-only encoders: every kind of backbone builds offline, gives the promised shapes,
and the projection is L2-normalised; unknown names are refused with the choices."""

from __future__ import annotations

import pytest
import torch

from clipfnd.errors import UserError
from clipfnd.models.vision import create_vision


@pytest.mark.parametrize(
    "name,small,size,dim",
    [
        ("tiny", False, 32, 64),
        ("resnet18", True, 32, 512),
        ("resnet18", False, 64, 512),
        ("clipfnd-tiny-vit", False, 32, None),
    ],
)
def test_backbones_build_offline_and_project(name, small, size, dim):
    torch.manual_seed(0)
    bundle = create_vision(name, proj_hidden=64, proj_dim=16, small_images=small)
    model = bundle.model.train()
    x = torch.randn(4, 3, size, size)
    feats = model.features(x)
    assert feats.shape == (4, dim if dim is not None else model.feature_dim)
    z = model(x)
    assert z.shape == (4, 16)
    torch.testing.assert_close(z.norm(dim=1), torch.ones(4))
    z.sum().backward()
    assert all(p.grad is not None for p in model.projector.parameters())


def test_small_image_stem_keeps_resolution():
    """SimCLR's CIFAR stem: a 3x3 stride-1 first convolution and no max pooling."""
    stem = create_vision("resnet18", small_images=True).model.backbone
    assert stem.conv1.kernel_size == (3, 3) and stem.conv1.stride == (1, 1)
    assert isinstance(stem.maxpool, torch.nn.Identity)


def test_unknown_encoder_is_refused_with_the_choices():
    with pytest.raises(UserError, match="unknown vision encoder 'resnet7'.*tiny, resnet18"):
        create_vision("resnet7")
