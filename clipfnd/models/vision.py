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

import math
from dataclasses import dataclass
from typing import Any

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
    compares); ``features`` the backbone's features (what kNN and linear probes read), and
    ``encode_image`` the same, as evaluation code calls it for any model.

    ``logit_scale`` (``ln(1/tau)``) is the temperature as the training methods read it; the
    vision-only methods set and freeze it.
    """

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
        self.logit_scale = nn.Parameter(torch.tensor(math.log(1 / 0.07)), requires_grad=False)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone(images)

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Activation checkpointing in the backbone, where it has it (open_clip towers)."""
        if not hasattr(self.backbone, "set_grad_checkpointing"):
            raise NotImplementedError(
                f"the {type(self.backbone).__name__} backbone has no activation checkpointing"
            )
        self.backbone.set_grad_checkpointing(enable)

    def encode_image(self, images: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        f = self.features(images)
        return F.normalize(f, dim=-1) if normalize else f

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.projector(self.features(images)), dim=-1)


class Projections(nn.Module):
    """``encode_image`` = the normalised projections of a ``SimCLRModel`` (what IFND clusters),
    for code that encodes datasets through ``encode_image``."""

    def __init__(self, model: SimCLRModel):
        super().__init__()
        self.model = model

    def encode_image(self, images: torch.Tensor, normalize: bool = True) -> torch.Tensor:
        return self.model(images)


@dataclass
class VisionBundle:
    """What a vision-only run needs of its model, shaped like ``ClipBundle`` (no tokenizer):
    ``preprocess_train`` makes two augmented views ``[2, 3, S, S]`` of an image,
    ``preprocess_val`` one resized, centre-cropped, normalised image."""

    model: SimCLRModel
    preprocess_train: Any
    preprocess_val: Any
    tokenizer: None
    name: str


def eval_transform(size: int):
    from torchvision.transforms import v2

    from data_pipelines.augment import MEAN, STD

    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(size, antialias=True),
            v2.CenterCrop(size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )


def create_vision(
    name: str,
    *,
    proj_hidden: int = 2048,
    proj_dim: int = 128,
    small_images: bool = False,
    image_size: int = 32,
    augment_strength: float = 0.5,
    crop_min_scale: float = 0.08,
    blur: bool = True,
) -> VisionBundle:
    """A ``SimCLRModel`` around the backbone ``name`` (see the module docstring), with SimCLR's
    two-view augmentation at ``image_size`` and the evaluation transform."""
    from data_pipelines.augment import TwoViews, simclr_augment

    net, dim = backbone(name, small_images)
    views = TwoViews(
        simclr_augment(image_size, augment_strength, scale=(crop_min_scale, 1.0), blur=blur)
    )
    return VisionBundle(
        SimCLRModel(net, dim, proj_hidden, proj_dim), views, eval_transform(image_size), None, name
    )


def vision_from_config(config: dict[str, Any]) -> VisionBundle:
    """The model a vision-only run's saved config (a plain dict) describes."""
    model, data = config.get("model") or {}, config.get("data") or {}
    return create_vision(
        model.get("name", "tiny"),
        proj_hidden=model.get("proj_hidden", 2048),
        proj_dim=model.get("proj_dim", 128),
        small_images=model.get("small_images", False),
        image_size=data.get("image_size", 32),
        augment_strength=data.get("augment_strength", 0.5),
        crop_min_scale=data.get("crop_min_scale", 0.08),
        blur=data.get("blur", True),
    )
