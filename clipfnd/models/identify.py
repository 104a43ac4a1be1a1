"""Which open_clip model a state dict belongs to, read from its tensors' shapes: for the
one-line error of weights loaded into the wrong model (``--model RN50 --pretrained`` a ViT's
weights), which open_clip reports as a shape assertion or a size mismatch."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any


def _blocks(sd: Mapping[str, Any], prefix: str) -> int:
    """How many numbered blocks ``prefix{i}.`` the state dict has."""
    found = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    return max(found) + 1 if found else 0


def shape_of(sd: Mapping[str, Any]) -> dict[str, Any] | None:
    """The config an open_clip CLIP state dict was built from, as far as its shapes tell
    (``embed_dim``, ``vision_cfg`` and ``text_cfg`` in open_clip's keys), or None when it is
    not a plain open_clip CLIP (an HF text tower, a timm image tower)."""
    try:
        embed_dim = sd["text_projection"].shape[-1]
        text = {
            "context_length": sd["positional_embedding"].shape[0],
            "vocab_size": sd["token_embedding.weight"].shape[0],
            "width": sd["token_embedding.weight"].shape[1],
            "layers": _blocks(sd, "transformer.resblocks."),
        }
        if "visual.conv1.weight" in sd and "visual.class_embedding" in sd:  # a ViT
            conv = sd["visual.conv1.weight"]
            grid = math.isqrt(sd["visual.positional_embedding"].shape[0] - 1)
            vision = {
                "image_size": grid * conv.shape[-1],
                "layers": _blocks(sd, "visual.transformer.resblocks."),
                "width": conv.shape[0],
                "patch_size": conv.shape[-1],
            }
        elif "visual.layer1.0.conv1.weight" in sd:  # open_clip's ModifiedResNet
            grid = math.isqrt(sd["visual.attnpool.positional_embedding"].shape[0] - 1)
            vision = {
                "image_size": grid * 32,
                "layers": [_blocks(sd, f"visual.layer{i}.") for i in range(1, 5)],
                "width": sd["visual.layer1.0.conv1.weight"].shape[0],
                "patch_size": None,
            }
        else:
            return None
    except (KeyError, AttributeError, IndexError, ValueError):
        return None
    return {"embed_dim": int(embed_dim), "vision_cfg": vision, "text_cfg": text}


def _matches(shape: dict[str, Any], cfg: dict[str, Any]) -> bool:
    if cfg.get("embed_dim") != shape["embed_dim"]:
        return False
    for part in ("vision_cfg", "text_cfg"):
        have = cfg.get(part) or {}
        for key, value in shape[part].items():
            default = {"context_length": 77, "vocab_size": 49408, "patch_size": None}
            if have.get(key, default.get(key)) != value:
                return False
    return True


def describe(shape: dict[str, Any]) -> str:
    v, t = shape["vision_cfg"], shape["text_cfg"]
    if v["patch_size"] is None:
        image = f"a ResNet (layers {v['layers']}, width {v['width']}, {v['image_size']} px)"
    else:
        image = (
            f"a ViT (width {v['width']}, {v['layers']} layers, patch {v['patch_size']}, "
            f"{v['image_size']} px)"
        )
    return (
        f"{image} with a {t['width']}-wide, {t['layers']}-layer text tower, embedding "
        f"{shape['embed_dim']}"
    )


def models_of(sd: Mapping[str, Any]) -> tuple[list[str], str | None]:
    """The open_clip model names whose config gives ``sd``'s shapes, and the shapes in words
    (None: not a plain open_clip CLIP state dict)."""
    import open_clip

    shape = shape_of(sd)
    if shape is None:
        return [], None
    names = [
        n for n in open_clip.list_models() if _matches(shape, open_clip.get_model_config(n) or {})
    ]
    return names, describe(shape)
