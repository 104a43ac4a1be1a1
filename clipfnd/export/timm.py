"""``--format timm``: the image tower, without its projection, as a timm VisionTransformer.

The weights are converted with timm's own OpenAI-CLIP converter
(``timm.models.vision_transformer.checkpoint_filter_fn``, which calls ``_convert_openai_clip``);
the projection (timm's ``head``) is dropped, and the model is built with ``num_classes=0`` and
``global_pool='token'``, so its output is open_clip's pooled image feature *before* ``proj``.
The folder (``config.json`` + ``model.safetensors``, written by ``timm.models.save_for_hf``)
loads with ``timm.create_model('local-dir:DIR', pretrained=True)``.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

import torch

from ..checkpoints import LoadedCheckpoint
from ..models.factory import model_config
from .architecture import VisionSpec, vision_spec
from .common import Comparison, state_dict_for_export, verification_batch

TARGET = "timm's VisionTransformer"
# a timm architecture with CLIP's pre-norm and LayerNorm(eps=1e-5); model_args set the sizes
BASE_ARCHITECTURE = "vit_base_patch16_clip_224"


def model_args(vision: VisionSpec) -> dict:
    """Arguments of ``timm.create_model(BASE_ARCHITECTURE, **args)`` for this tower."""
    return {
        "img_size": vision.image_size,
        "patch_size": vision.patch_size,
        "embed_dim": vision.width,
        "depth": vision.layers,
        "num_heads": vision.heads,
        "mlp_ratio": vision.mlp_ratio,
        "num_classes": 0,
        "global_pool": "token",
        "act_layer": "quick_gelu" if vision.quick_gelu else "gelu",
    }


def build(vision: VisionSpec, clip_state_dict: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The timm model holding the image tower of ``clip_state_dict`` (no head)."""
    import timm
    from timm.models.vision_transformer import checkpoint_filter_fn

    model = timm.create_model(BASE_ARCHITECTURE, pretrained=False, **model_args(vision))
    sd = checkpoint_filter_fn(clip_state_dict, model)
    sd = {k: v for k, v in sd.items() if not k.startswith("head.")}  # the projection
    model.load_state_dict(sd, strict=True)
    return model.eval()


def check(loaded: LoadedCheckpoint) -> VisionSpec:
    """The image tower's dimensions, or UnsupportedExport when timm's ViT cannot hold it."""
    return vision_spec(loaded.model, model_config(loaded.model_name), loaded.model_name, TARGET)


def export(loaded: LoadedCheckpoint, out: Path) -> list[str]:
    """Write the timm folder; return the files written."""
    from timm.models import save_for_hf

    vision = check(loaded)
    model = build(vision, state_dict_for_export(loaded.model))
    pp = loaded.model.visual.preprocess_cfg
    data_config = {
        "input_size": (3, vision.image_size, vision.image_size),
        "mean": tuple(float(v) for v in pp["mean"]),
        "std": tuple(float(v) for v in pp["std"]),
        "interpolation": pp.get("interpolation", "bicubic"),
        "crop_pct": 1.0,  # resize the short side to image_size, then centre-crop, as open_clip
        "crop_mode": "center",
    }
    save_for_hf(
        model,
        str(out),
        model_args=model_args(vision),
        safe_serialization=True,
        data_config=data_config,
    )
    # the base architecture's pretrained tag and licence describe other weights: drop them
    config_path = out / "config.json"
    cfg = json.loads(config_path.read_text())
    for key in ("tag", "license", "hf_hub_id", "url"):
        cfg.get("pretrained_cfg", {}).pop(key, None)
    cfg["pretrained_cfg"]["tag"] = "clipfnd"
    config_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return sorted(p.name for p in out.iterdir())


@torch.no_grad()
def timm_outputs(out: Path) -> tuple[torch.Tensor, list]:
    """The export loaded by timm and run, with timm's own transforms, on the verification
    images; returns its outputs and the images."""
    import timm

    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()
    data_config = timm.data.resolve_data_config({}, model=model)
    transform = timm.data.create_transform(**data_config, is_training=False)
    images, _ = verification_batch(data_config["input_size"][-1])
    return model(torch.stack([transform(im) for im in images])), images


@torch.no_grad()
def verify(loaded: LoadedCheckpoint, out: Path, tolerance: float) -> Comparison:
    """timm's pooled features (with timm's transforms) against open_clip's, before ``proj``."""
    theirs, images = timm_outputs(out)

    visual = copy.deepcopy(loaded.model.visual).eval()
    visual.proj = None  # open_clip's pooled output before the projection
    ours = visual(torch.stack([loaded.bundle.preprocess_val(im) for im in images]))
    cmp = Comparison(tolerance=tolerance)
    cmp.add("image features (before proj)", ours, theirs)
    return cmp
