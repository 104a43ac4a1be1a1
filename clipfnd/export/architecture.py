"""Which open_clip models are a plain CLIP: a ViT image tower and a causal text transformer.

transformers' ``CLIPModel`` and timm's ``VisionTransformer`` represent exactly OpenAI-CLIP
style towers: learned position embeddings, a class token, pre-LayerNorm, LayerNorm eps
1e-5, GELU or QuickGELU, a bias-free linear projection, and (text) argmax/EOT pooling under
a causal mask. Anything else (ResNet or timm image towers, attentional pooling, layer scale,
custom attention blocks, Hugging Face text towers, SigLIP's logit bias, CoCa) is refused with
the list of reasons, before anything is written.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

import open_clip
import torch
from open_clip.model import CLIPTextCfg, CLIPVisionCfg

from .common import UnsupportedExport

# fields whose value must stay at open_clip's default for a plain tower
_CUSTOM_BLOCK = (
    "qk_norm",
    "scaled_cosine_attn",
    "scale_heads",
    "scale_attn_inner",
    "scale_attn",
    "scale_fc",
)
_VISION_DEFAULTS: dict[str, Any] = {
    "ls_init_value": None,
    "attentional_pool": False,
    "no_ln_pre": False,
    "pos_embed_type": "learnable",
    "final_ln_after_pool": False,
    "pool_type": "tok",
    "act_kwargs": None,
    "norm_kwargs": None,
    "timm_model_name": None,
    **{k: False for k in _CUSTOM_BLOCK},
}
_TEXT_DEFAULTS: dict[str, Any] = {
    "hf_model_name": None,
    "hf_tokenizer_name": None,
    "tokenizer_mode": None,
    "ls_init_value": None,
    "embed_cls": False,
    "no_causal_mask": False,
    "final_ln_after_pool": False,
    "pool_type": "argmax",
    "proj_bias": False,
    "proj_type": "linear",
    "act_kwargs": None,
    "norm_kwargs": None,
    "vocab_size": 49408,
    **{k: False for k in _CUSTOM_BLOCK},
}


@dataclass(frozen=True)
class VisionSpec:
    image_size: int
    patch_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    quick_gelu: bool

    @property
    def intermediate_size(self) -> int:
        return int(self.width * self.mlp_ratio)


@dataclass(frozen=True)
class TextSpec:
    context_length: int
    vocab_size: int
    width: int
    layers: int
    heads: int
    mlp_ratio: float
    quick_gelu: bool

    @property
    def intermediate_size(self) -> int:
        return int(self.width * self.mlp_ratio)


def _known(cls: type, cfg: dict[str, Any]) -> Any:
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in cfg.items() if k in names})


def _off_default(cfg: Any, defaults: dict[str, Any], where: str) -> list[str]:
    reasons = []
    for key, want in defaults.items():
        have = getattr(cfg, key)
        if have != want:
            reasons.append(f"{where}.{key}={have!r} (a plain CLIP tower has {want!r})")
    block = getattr(cfg, "block_type", None)
    if block not in (None, "default"):
        reasons.append(f"{where}.block_type={block!r}")
    return reasons


def _refuse(model_name: str, target: str, reasons: list[str]) -> None:
    if reasons:
        raise UnsupportedExport(
            f"model {model_name!r} cannot be exported to {target}, which represents only plain "
            "OpenAI-CLIP style towers (a ViT image tower and a causal text transformer); "
            f"{model_name!r} has " + "; ".join(reasons)
        )


def vision_spec(
    model: torch.nn.Module, model_cfg: dict[str, Any], model_name: str, target: str
) -> VisionSpec:
    """The image tower's dimensions, or :class:`UnsupportedExport` naming what does not fit."""
    raw = dict(model_cfg.get("vision_cfg") or {})
    reasons = []
    if not isinstance(model.visual, open_clip.transformer.VisionTransformer):
        reasons.append(f"a {type(model.visual).__name__} image tower, not a ViT")
        _refuse(model_name, target, reasons)
    cfg = _known(CLIPVisionCfg, raw)
    reasons += _off_default(cfg, _VISION_DEFAULTS, "vision_cfg")
    size = cfg.image_size
    if isinstance(size, (tuple, list)):
        if len(set(size)) != 1:
            reasons.append(f"a non-square image size {tuple(size)}")
        size = size[0]
    if not isinstance(cfg.layers, int):
        reasons.append(f"vision_cfg.layers={cfg.layers!r} (ResNet stages)")
    if cfg.width % cfg.head_width:
        reasons.append(f"width {cfg.width} not divisible by head_width {cfg.head_width}")
    if getattr(model.visual, "proj", None) is None:
        reasons.append("no image projection")
    _refuse(model_name, target, reasons)
    return VisionSpec(
        int(size),
        int(cfg.patch_size),
        int(cfg.width),
        int(cfg.layers),
        int(cfg.width // cfg.head_width),
        float(cfg.mlp_ratio),
        bool(model_cfg.get("quick_gelu", False)),
    )


def text_spec(
    model: torch.nn.Module, model_cfg: dict[str, Any], model_name: str, target: str
) -> TextSpec:
    """The text tower's dimensions, or :class:`UnsupportedExport` naming what does not fit."""
    reasons = []
    if type(model) is not open_clip.CLIP:
        reasons.append(
            f"a {type(model).__name__} model (not open_clip.CLIP with its built-in "
            "text transformer)"
        )
    for key in ("custom_text", "multimodal_cfg", "init_logit_bias"):
        if model_cfg.get(key):
            reasons.append(f"{key}={model_cfg[key]!r}")
    cfg = _known(CLIPTextCfg, dict(model_cfg.get("text_cfg") or {}))
    reasons += _off_default(cfg, _TEXT_DEFAULTS, "text_cfg")
    _refuse(model_name, target, reasons)
    return TextSpec(
        int(cfg.context_length),
        int(cfg.vocab_size),
        int(cfg.width),
        int(cfg.layers),
        int(cfg.heads),
        float(cfg.mlp_ratio),
        bool(model_cfg.get("quick_gelu", False)),
    )
