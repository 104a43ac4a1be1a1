"""Exporting the backbone of a vision-only (``mode: simclr``) checkpoint.

A vision-only checkpoint holds a ``SimCLRModel``: a backbone, SimCLR's projection head and a
frozen temperature. What is worth exporting is the backbone (its features are what kNN and
linear probes read); the projection head and the temperature stay behind.

- ``--format torchvision`` (any backbone): ``backbone.safetensors`` (the backbone's state dict),
  ``backbone.json`` (how to rebuild it: architecture, ``small_images``, feature dimension, the
  evaluation image size, resize and normalisation) and ``README.md`` (a loading snippet).
  ResNets rebuild with ``torchvision.models.resnetNN(weights=None)`` (``fc = nn.Identity()``,
  and SimCLR's small-image stem when ``small_images`` is set); ``tiny`` and open_clip towers
  with ``clipfnd.models.vision.backbone(name, small_images)``.
- ``--format timm``: ResNets as timm's ``resnetNN`` with ``num_classes=0`` (timm's ResNet state
  dict has torchvision's keys); open_clip ViT towers as timm's ``VisionTransformer`` through
  the same OpenAI-CLIP converter as CLIP checkpoints, keeping the tower's projection as timm's
  ``head`` (with a zero bias) since SimCLR's features are the tower's projected output. Both are
  written with ``timm.models.save_for_hf`` and load as ``timm.create_model('local-dir:DIR',
  pretrained=True)``. Refused: ``small_images`` ResNets (no timm ResNet stem is a single 3x3
  stride-1 convolution without max pooling), ``tiny`` (no timm architecture), and non-ViT
  open_clip towers.
- ``--format open_clip`` / ``hf``: refused (both formats are two-tower CLIP models).

``--verify`` rebuilds the backbone from the written files alone and compares its features on a
fixed batch with ``model.features`` of the checkpoint (eval mode).
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import safetensors.torch
import torch
from torch import nn

from ..checkpoints import LoadedCheckpoint
from .common import Comparison, UnsupportedExport, state_dict_for_export, verification_batch

VISION_MODES = ("simclr",)
WEIGHTS_NAME = "backbone.safetensors"
SPEC_NAME = "backbone.json"
README_NAME = "README.md"
CLIPFND_BUILDER = "clipfnd.models.vision.backbone"
NO_TEXT_TOWER = "a vision-only checkpoint has no text tower; use --format timm or torchvision"
# what clipfnd's evaluation transform does (clipfnd.models.vision.eval_transform)
INTERPOLATION = "bilinear"
RESIZE = "resize the shorter side to image_size (bilinear, antialiased), then centre-crop"


def is_vision(loaded: LoadedCheckpoint) -> bool:
    """Whether ``loaded`` is a vision-only checkpoint (its run config's ``mode``)."""
    return (loaded.config or {}).get("mode", "clip") in VISION_MODES


@dataclass(frozen=True)
class BackboneSpec:
    """How to rebuild the backbone and feed it (written as ``backbone.json``)."""

    architecture: str
    kind: str  # "resnet" | "tiny" | "open_clip"
    builder: str
    small_images: bool
    feature_dim: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        d["mean"], d["std"] = list(self.mean), list(self.std)
        d.update(
            weights=WEIGHTS_NAME,
            fc="identity" if self.kind == "resnet" else None,
            interpolation=INTERPOLATION,
            resize=RESIZE,
            output=(
                "the backbone's features, before SimCLR's projection head "
                "(clipfnd's SimCLRModel.features)"
            ),
        )
        return d

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> BackboneSpec:
        return cls(
            architecture=d["architecture"],
            kind=d["kind"],
            builder=d["builder"],
            small_images=bool(d["small_images"]),
            feature_dim=int(d["feature_dim"]),
            image_size=int(d["image_size"]),
            mean=tuple(float(v) for v in d["mean"]),
            std=tuple(float(v) for v in d["std"]),
        )


def backbone_spec(loaded: LoadedCheckpoint) -> BackboneSpec:
    """The backbone of a vision-only checkpoint, as its run config built it."""
    from data_pipelines.augment import MEAN, STD

    from ..models.vision import RESNETS

    model_cfg = (loaded.config or {}).get("model") or {}
    data_cfg = (loaded.config or {}).get("data") or {}
    name = model_cfg.get("name", "tiny")  # what vision_from_config builds
    small = bool(model_cfg.get("small_images", False))
    if name in RESNETS:
        kind, builder = "resnet", f"torchvision.models.{name}"
    elif name == "tiny":
        kind, builder = "tiny", CLIPFND_BUILDER
    else:
        kind, builder = "open_clip", CLIPFND_BUILDER
    return BackboneSpec(
        architecture=name,
        kind=kind,
        builder=builder,
        small_images=small if kind == "resnet" else False,  # only ResNets read it
        feature_dim=int(loaded.model.feature_dim),
        image_size=int(data_cfg.get("image_size", 32)),
        mean=tuple(float(v) for v in MEAN),
        std=tuple(float(v) for v in STD),
    )


def _require_vision(loaded: LoadedCheckpoint, fmt: str) -> BackboneSpec:
    if not is_vision(loaded):
        raise UnsupportedExport(
            f"--format {fmt} exports the backbone of a vision-only (mode: simclr) checkpoint; "
            "this is a CLIP checkpoint: use --format open_clip, hf or timm"
        )
    return backbone_spec(loaded)


def eval_transform(spec: BackboneSpec):
    """clipfnd's evaluation transform, from ``backbone.json`` alone."""
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(spec.image_size, antialias=True),
            v2.CenterCrop(spec.image_size),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(spec.mean), list(spec.std)),
        ]
    )


def build_torchvision_resnet(name: str, small_images: bool) -> nn.Module:
    """torchvision's ``name`` with ``fc = Identity`` (and SimCLR's small-image stem)."""
    import torchvision

    net = getattr(torchvision.models, name)(weights=None)
    if small_images:
        net.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)
        net.maxpool = nn.Identity()
    net.fc = nn.Identity()
    return net


def load_backbone(out: str | Path) -> tuple[nn.Module, BackboneSpec]:
    """The backbone rebuilt from ``backbone.json`` + ``backbone.safetensors`` (eval mode)."""
    out = Path(out)
    spec = BackboneSpec.from_json(json.loads((out / SPEC_NAME).read_text()))
    if spec.kind == "resnet":
        net = build_torchvision_resnet(spec.architecture, spec.small_images)
    else:
        from ..models.vision import backbone

        net, _ = backbone(spec.architecture, spec.small_images)
    net.load_state_dict(safetensors.torch.load_file(str(out / WEIGHTS_NAME)), strict=True)
    return net.eval(), spec


def _readme(spec: BackboneSpec) -> str:
    mean = ", ".join(f"{v:g}" for v in spec.mean)
    std = ", ".join(f"{v:g}" for v in spec.std)
    if spec.kind == "resnet":
        build = [
            "import torchvision",
            "from torch import nn",
            "",
            f"model = torchvision.models.{spec.architecture}(weights=None)",
        ]
        if spec.small_images:
            build += [
                "# SimCLR's small-image stem: a 3x3 stride-1 conv1 and no max pooling",
                "model.conv1 = nn.Conv2d(3, 64, kernel_size=3, stride=1, padding=1, bias=False)",
                "model.maxpool = nn.Identity()",
            ]
        build += ["model.fc = nn.Identity()  # features, no classifier"]
    else:
        build = [
            "from clipfnd.models.vision import backbone",
            "",
            f'model, dim = backbone("{spec.architecture}", small_images={spec.small_images})',
        ]
    lines = [
        f"# {spec.architecture} backbone exported by clipfnd",
        "",
        f"The backbone of a vision-only (SimCLR) checkpoint: `{WEIGHTS_NAME}` (its state dict)",
        f"and `{SPEC_NAME}` (how to rebuild and feed it). It outputs {spec.feature_dim}-dim",
        "features (before the projection head). Inputs: "
        f"{spec.image_size}x{spec.image_size} RGB, normalised with",
        f"mean ({mean}) and std ({std}); {RESIZE}.",
        "",
        "```python",
        "import safetensors.torch, torch",
        "from PIL import Image",
        "from torchvision.transforms import v2",
        *build,
        f'model.load_state_dict(safetensors.torch.load_file("{WEIGHTS_NAME}"))',
        "model.eval()",
        "transform = v2.Compose([",
        "    v2.ToImage(),",
        f"    v2.Resize({spec.image_size}, antialias=True),",
        f"    v2.CenterCrop({spec.image_size}),",
        "    v2.ToDtype(torch.float32, scale=True),",
        f"    v2.Normalize(({mean}), ({std})),",
        "])",
        "with torch.no_grad():",
        '    features = model(transform(Image.open("cat.jpg").convert("RGB")).unsqueeze(0))',
        "```",
        "",
    ]
    return "\n".join(lines)


@torch.no_grad()
def _our_features(loaded: LoadedCheckpoint, images) -> torch.Tensor:
    """``model.features`` of the checkpoint (a copy in eval mode) with its own transform."""
    model = copy.deepcopy(loaded.model).eval()
    pixels = torch.stack([loaded.bundle.preprocess_val(im) for im in images])
    return model.features(pixels)


# --- --format torchvision ---------------------------------------------------------------------


def torchvision_check(loaded: LoadedCheckpoint) -> BackboneSpec:
    return _require_vision(loaded, "torchvision")


def torchvision_export(loaded: LoadedCheckpoint, out: Path) -> list[str]:
    spec = torchvision_check(loaded)
    sd = state_dict_for_export(loaded.model.backbone)
    safetensors.torch.save_file(sd, str(out / WEIGHTS_NAME), metadata={"format": "pt"})
    (out / SPEC_NAME).write_text(json.dumps(spec.to_json(), indent=2) + "\n")
    (out / README_NAME).write_text(_readme(spec))
    return [WEIGHTS_NAME, SPEC_NAME, README_NAME]


@torch.no_grad()
def torchvision_verify(loaded: LoadedCheckpoint, out: Path, tolerance: float) -> Comparison:
    """The backbone rebuilt from the files (torchvision for ResNets) against ours."""
    net, spec = load_backbone(out)
    images, _ = verification_batch(spec.image_size)
    transform = eval_transform(spec)
    theirs = net(torch.stack([transform(im) for im in images]))
    cmp = Comparison(tolerance=tolerance)
    cmp.add("backbone features", _our_features(loaded, images), theirs)
    return cmp


# --- --format timm ----------------------------------------------------------------------------


def _open_clip_tower_spec(loaded: LoadedCheckpoint, spec: BackboneSpec):
    from ..models.factory import model_config
    from .architecture import vision_spec
    from .timm import TARGET

    try:
        return vision_spec(
            SimpleNamespace(visual=loaded.model.backbone),
            model_config(spec.architecture),
            spec.architecture,
            TARGET,
        )
    except UnsupportedExport as e:
        raise UnsupportedExport(f"{e}; use --format torchvision") from e


def timm_check(loaded: LoadedCheckpoint):
    """The backbone spec (and the ViT spec for an open_clip tower), or UnsupportedExport."""
    spec = _require_vision(loaded, "timm")
    if spec.kind == "resnet":
        if spec.small_images:
            raise UnsupportedExport(
                f"backbone {spec.architecture!r} with small_images=True cannot be exported to "
                "timm: its stem (a 3x3 stride-1 conv1 without max pooling) is not one of timm's "
                "ResNet stems, so timm.create_model cannot rebuild it; use --format torchvision"
            )
        return spec, None
    if spec.kind == "tiny":
        raise UnsupportedExport(
            "backbone 'tiny' (clipfnd's small conv net) has no timm architecture; "
            "use --format torchvision"
        )
    return spec, _open_clip_tower_spec(loaded, spec)


def _build_timm(loaded: LoadedCheckpoint, spec: BackboneSpec, vit) -> tuple[nn.Module, dict]:
    """The timm model holding the backbone, and its ``model_args``."""
    import timm

    sd = state_dict_for_export(loaded.model.backbone)
    if vit is None:  # a ResNet: timm's keys are torchvision's
        args = {"num_classes": 0}
        model = timm.create_model(spec.architecture, pretrained=False, **args)
        model.load_state_dict(sd, strict=True)
        return model.eval(), args

    from timm.models.vision_transformer import checkpoint_filter_fn

    from .timm import BASE_ARCHITECTURE, model_args

    # keep the tower's projection as timm's head (zero bias): SimCLR's features include it
    args = {**model_args(vit), "num_classes": spec.feature_dim}
    model = timm.create_model(BASE_ARCHITECTURE, pretrained=False, **args)
    model.load_state_dict(
        checkpoint_filter_fn({f"visual.{k}": v for k, v in sd.items()}, model), strict=True
    )
    return model.eval(), args


def timm_export(loaded: LoadedCheckpoint, out: Path) -> list[str]:
    from timm.models import save_for_hf

    spec, vit = timm_check(loaded)
    model, args = _build_timm(loaded, spec, vit)
    data_config = {
        "input_size": (3, spec.image_size, spec.image_size),
        "mean": spec.mean,
        "std": spec.std,
        "interpolation": INTERPOLATION,
        "crop_pct": 1.0,  # resize the short side to image_size, then centre-crop, as clipfnd
        "crop_mode": "center",
    }
    save_for_hf(model, str(out), model_args=args, safe_serialization=True, data_config=data_config)
    # the base architecture's pretrained tag, licence and test sizes describe other weights
    config_path = out / "config.json"
    cfg = json.loads(config_path.read_text())
    pretrained = cfg.setdefault("pretrained_cfg", {})
    for key in ("tag", "license", "hf_hub_id", "url", "paper_ids", "test_input_size"):
        pretrained.pop(key, None)
    pretrained["tag"] = "clipfnd"
    config_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return sorted(p.name for p in out.iterdir())


@torch.no_grad()
def timm_verify(loaded: LoadedCheckpoint, out: Path, tolerance: float) -> Comparison:
    """timm's output (with timm's transforms) against ``model.features``."""
    from .timm import timm_outputs

    theirs, images = timm_outputs(out)
    cmp = Comparison(tolerance=tolerance)
    cmp.add("backbone features", _our_features(loaded, images), theirs)
    return cmp


# --- dispatch ---------------------------------------------------------------------------------


def _refuse_two_tower(fmt: str):
    def check(loaded: LoadedCheckpoint) -> None:
        raise UnsupportedExport(f"cannot export to {fmt}: {NO_TEXT_TOWER}")

    def never(*_args, **_kwargs):
        check(None)  # check refuses first; here for completeness

    return SimpleNamespace(check=check, export=never, verify=never)


def format_module(fmt: str, loaded: LoadedCheckpoint) -> Any:
    """``check``/``export``/``verify`` of ``fmt`` for a vision-only checkpoint, or, for a CLIP
    checkpoint, of ``--format torchvision`` (whose check refuses it)."""
    if fmt == "torchvision":
        return SimpleNamespace(
            check=torchvision_check, export=torchvision_export, verify=torchvision_verify
        )
    if fmt == "timm":
        return SimpleNamespace(check=timm_check, export=timm_export, verify=timm_verify)
    return _refuse_two_tower(fmt)
