"""Vision-only encoders for SimCLR-style training: a backbone by name and SimCLR's projection
head (Chen et al., ICML 2020: a 2-layer MLP with batch norm, features taken before it).

Backbones, by name:
- ``tiny``: a small 4-layer conv net (64 features), for tests and quick runs;
- ``resnet18``, ``resnet34``, ``resnet50``: torchvision's, randomly initialised (nothing is
  downloaded); ``small_images=True`` swaps the stem for a 3x3 stride-1 convolution without max
  pooling, as SimCLR does for CIFAR-size (32 px) inputs;
- any open_clip model name (``ViT-B-32``, ``clipfnd-tiny-vit``, ...): its image tower.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UserError
from .factory import check_model_name, register_builtin_configs

RESNETS = ("resnet18", "resnet34", "resnet50")


def _tiny() -> tuple[nn.Module, int]:
    def block(cin: int, cout: int) -> nn.Sequential:
        return nn.Sequential(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()
        )

    net = nn.Sequential(
        block(3, 16),
        nn.MaxPool2d(2),
        block(16, 32),
        nn.MaxPool2d(2),
        block(32, 64),
        block(64, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return net, 64


def _resnet(name: str, small_images: bool) -> tuple[nn.Module, int]:
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if small_images:
        net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    dim = net.fc.in_features
    net.fc = nn.Identity()
    return net, dim


def _open_clip_tower(name: str) -> tuple[nn.Module, int]:
    import open_clip

    register_builtin_configs()
    check_model_name(name)
    tower = open_clip.create_model(name).visual
    return tower, int(tower.output_dim)


def backbone(name: str, small_images: bool = False) -> tuple[nn.Module, int]:
    """``(module, feature dimension)`` of the backbone ``name``."""
    if name == "tiny":
        return _tiny()
    if name in RESNETS:
        return _resnet(name, small_images)
    try:
        return _open_clip_tower(name)
    except UserError as e:
        raise UserError(
            f"unknown vision encoder {name!r}: use tiny, {', '.join(RESNETS)}, or {e}"
        ) from e


class SimCLRModel(nn.Module):
    """Backbone + projection head. ``forward`` gives L2-normalised projections (what the loss
    compares); ``features`` the backbone's features (what kNN and linear probes read)."""

    def __init__(
        self, backbone: nn.Module, feature_dim: int, proj_hidden: int = 2048, proj_dim: int = 128
    ):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim
        self.projector = nn.Sequential(
            nn.Linear(feature_dim, proj_hidden, bias=False),
            nn.BatchNorm1d(proj_hidden),
            nn.ReLU(),
            nn.Linear(proj_hidden, proj_dim),
        )

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.features(images)), dim=-1)


@dataclass
class VisionBundle:
    model: SimCLRModel
    name: str


def create_vision(
    name: str, *, proj_hidden: int = 2048, proj_dim: int = 128, small_images: bool = False
) -> VisionBundle:
    """A ``SimCLRModel`` around the backbone ``name`` (see the module docstring)."""
    net, dim = backbone(name, small_images)
    return VisionBundle(SimCLRModel(net, dim, proj_hidden, proj_dim), name)
