"""``--format open_clip``: a folder open_clip loads as ``local-dir:DIR``, plus a plain state dict.

Files:

- ``open_clip_config.json``: ``{"model_cfg": ..., "preprocess_cfg": ...}`` (the model's
  architecture and its image preprocessing: size, mean, std, interpolation, resize mode);
- ``open_clip_model.safetensors``: the CLIP model's state dict;
- ``open_clip_pytorch_model.bin``: the same state dict for ``pretrained=PATH``;
- ``MODEL_NAME.json``: the bare model config, for ``open_clip.add_model_config`` when the model
  is one of clipfnd's own (stock open_clip names need nothing).

Load it with ``open_clip.create_model_and_transforms('local-dir:DIR')`` and
``open_clip.get_tokenizer('local-dir:DIR')``.

Written here rather than by open_clip's ``save_for_hf``: that function also saves the
tokenizer with ``save_pretrained``, which only a Hugging Face tokenizer has (the project's models
use open_clip's BPE tokenizer, which ``local-dir:`` loads by itself), and its config writer
leaves the image size out of ``preprocess_cfg``, which this folder states for any reader.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import safetensors.torch
import torch

from ..checkpoints import LoadedCheckpoint
from ..models.factory import model_config
from .common import Comparison, our_embeddings, state_dict_for_export, verification_batch

CONFIG_NAME = "open_clip_config.json"
SAFETENSORS_NAME = "open_clip_model.safetensors"
PYTORCH_NAME = "open_clip_pytorch_model.bin"


def _jsonable(value):
    return list(value) if isinstance(value, tuple) else value


def check(loaded: LoadedCheckpoint) -> None:
    """Every open_clip model can be written back for open_clip."""
    model_config(loaded.model_name)


def export(loaded: LoadedCheckpoint, out: Path) -> list[str]:
    """Write the open_clip folder; return the files written."""
    cfg = model_config(loaded.model_name)
    preprocess = {k: _jsonable(v) for k, v in loaded.model.visual.preprocess_cfg.items()}
    (out / CONFIG_NAME).write_text(
        json.dumps({"model_cfg": cfg, "preprocess_cfg": preprocess}, indent=2) + "\n"
    )
    (out / f"{loaded.model_name}.json").write_text(json.dumps(cfg, indent=2) + "\n")
    sd = state_dict_for_export(loaded.model)
    safetensors.torch.save_file(sd, str(out / SAFETENSORS_NAME))
    torch.save(sd, out / PYTORCH_NAME)
    return [CONFIG_NAME, f"{loaded.model_name}.json", SAFETENSORS_NAME, PYTORCH_NAME]


@torch.no_grad()
def _embed(model, preprocess, tokenizer, images, texts) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    image = model.encode_image(torch.stack([preprocess(im) for im in images]), normalize=True)
    text = model.encode_text(tokenizer(texts), normalize=True)
    return image, text


def verify(loaded: LoadedCheckpoint, out: Path, tolerance: float) -> Comparison:
    """Load both files through open_clip and compare embeddings with ours."""
    size = loaded.model.visual.preprocess_cfg["size"]
    images, texts = verification_batch(size[0] if isinstance(size, (tuple, list)) else size)
    ours_image, ours_text = our_embeddings(loaded, images, texts)
    cmp = Comparison(tolerance=tolerance)

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    image, text = _embed(model, preprocess, tokenizer, images, texts)
    cmp.add("image (local-dir)", ours_image, image)
    cmp.add("text (local-dir)", ours_text, text)

    # the plain state dict, through the model name (clipfnd's configs are registered here)
    model, _, preprocess = open_clip.create_model_and_transforms(
        loaded.model_name, pretrained=str(out / PYTORCH_NAME)
    )
    image, text = _embed(
        model, preprocess, open_clip.get_tokenizer(loaded.model_name), images, texts
    )
    cmp.add("image (state dict)", ours_image, image)
    cmp.add("text (state dict)", ours_text, text)
    return cmp
