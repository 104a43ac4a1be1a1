"""``--format hf``: a folder that ``transformers.CLIPModel`` and ``CLIPProcessor`` load offline.

Files: ``config.json`` + ``model.safetensors`` (``CLIPModel.save_pretrained``), the tokenizer
(``vocab.json``/``merges.txt`` from open_clip's BPE vocabulary, ``tokenizer.json``,
``tokenizer_config.json``) and ``processor_config.json`` (the image processor with the model's
image size, mean and std, bicubic resize and centre crop).

Weight mapping (exact; see docs/evaluation.md): ``attn.in_proj_*`` splits in three into
``q_proj/k_proj/v_proj``; ``ln_1/ln_2`` -> ``layer_norm1/2``; ``mlp.c_fc/c_proj`` ->
``mlp.fc1/fc2``; ``resblocks.K`` -> ``encoder.layers.K``; ``visual.conv1`` ->
``patch_embedding``; ``ln_pre`` -> ``pre_layrnorm`` (sic); ``ln_post`` -> ``post_layernorm``;
``ln_final`` -> ``final_layer_norm``; ``visual.proj`` and ``text_projection`` transposed into
``visual_projection`` / ``text_projection``; ``logit_scale`` as is.
"""

from __future__ import annotations

import json
from pathlib import Path

import open_clip
import torch

from data_pipelines.offline import stay_offline

from ..checkpoints import LoadedCheckpoint
from ..models.factory import model_config
from .architecture import TextSpec, VisionSpec, text_spec, vision_spec
from .common import Comparison, our_embeddings, state_dict_for_export, verification_batch

TARGET = "transformers' CLIPModel"
BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def _layers(sd: dict[str, torch.Tensor], src: str, dst: str, n: int) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(n):
        p, q = f"{src}resblocks.{i}.", f"{dst}encoder.layers.{i}."
        for part in ("weight", "bias"):
            for j, proj in enumerate(torch.chunk(sd[f"{p}attn.in_proj_{part}"], 3)):
                out[f"{q}self_attn.{'qkv'[j]}_proj.{part}"] = proj
            out[f"{q}self_attn.out_proj.{part}"] = sd[f"{p}attn.out_proj.{part}"]
            out[f"{q}layer_norm1.{part}"] = sd[f"{p}ln_1.{part}"]
            out[f"{q}layer_norm2.{part}"] = sd[f"{p}ln_2.{part}"]
            out[f"{q}mlp.fc1.{part}"] = sd[f"{p}mlp.c_fc.{part}"]
            out[f"{q}mlp.fc2.{part}"] = sd[f"{p}mlp.c_proj.{part}"]
    return out


def convert_state_dict(
    sd: dict[str, torch.Tensor], vision: VisionSpec, text: TextSpec
) -> dict[str, torch.Tensor]:
    """open_clip CLIP state dict -> transformers CLIPModel state dict."""
    out = _layers(sd, "visual.transformer.", "vision_model.", vision.layers)
    out.update(_layers(sd, "transformer.", "text_model.", text.layers))
    ve = "vision_model.embeddings."
    out[ve + "class_embedding"] = sd["visual.class_embedding"]
    out[ve + "patch_embedding.weight"] = sd["visual.conv1.weight"]
    out[ve + "position_embedding.weight"] = sd["visual.positional_embedding"]
    for ours, theirs in (("ln_pre", "pre_layrnorm"), ("ln_post", "post_layernorm")):
        for part in ("weight", "bias"):
            out[f"vision_model.{theirs}.{part}"] = sd[f"visual.{ours}.{part}"]
    out["visual_projection.weight"] = sd["visual.proj"].T
    out["text_model.embeddings.token_embedding.weight"] = sd["token_embedding.weight"]
    out["text_model.embeddings.position_embedding.weight"] = sd["positional_embedding"]
    for part in ("weight", "bias"):
        out[f"text_model.final_layer_norm.{part}"] = sd[f"ln_final.{part}"]
    out["text_projection.weight"] = sd["text_projection"].T
    out["logit_scale"] = sd["logit_scale"]
    return {k: v.contiguous().clone() for k, v in out.items()}


def clip_config(vision: VisionSpec, text: TextSpec, embed_dim: int, logit_scale: float):
    """The ``transformers.CLIPConfig`` with our towers' dimensions."""
    from transformers import CLIPConfig

    act = "quick_gelu" if vision.quick_gelu else "gelu"
    return CLIPConfig(
        text_config=dict(
            vocab_size=text.vocab_size,
            hidden_size=text.width,
            intermediate_size=text.intermediate_size,
            num_hidden_layers=text.layers,
            num_attention_heads=text.heads,
            max_position_embeddings=text.context_length,
            hidden_act=act,
            layer_norm_eps=1e-5,
            projection_dim=embed_dim,
            bos_token_id=49406,
            eos_token_id=49407,
            pad_token_id=49407,
        ),
        vision_config=dict(
            hidden_size=vision.width,
            intermediate_size=vision.intermediate_size,
            num_hidden_layers=vision.layers,
            num_attention_heads=vision.heads,
            image_size=vision.image_size,
            patch_size=vision.patch_size,
            hidden_act=act,
            layer_norm_eps=1e-5,
            projection_dim=embed_dim,
        ),
        projection_dim=embed_dim,
        logit_scale_init_value=logit_scale,
    )


def bpe_vocabulary() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """open_clip's BPE vocabulary and merges, with the special tokens named as in HF CLIP."""
    tok = open_clip.tokenizer.SimpleTokenizer()
    vocab = dict(tok.encoder)
    for ours, theirs in ((tok.sot_token_id, BOS), (tok.eot_token_id, EOS)):
        vocab.pop(tok.decoder[ours])
        vocab[theirs] = ours
    merges = [pair for pair, _ in sorted(tok.bpe_ranks.items(), key=lambda kv: kv[1])]
    return vocab, merges


def write_tokenizer_files(out: Path, vocab: dict[str, int], merges: list[tuple[str, str]]) -> None:
    """``vocab.json`` and ``merges.txt`` in the layout of OpenAI's CLIP tokenizer."""
    (out / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    lines = ["#version: 0.2"] + [f"{a} {b}" for a, b in merges]
    (out / "merges.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")


def check(loaded: LoadedCheckpoint) -> tuple[VisionSpec, TextSpec]:
    """Both towers' dimensions, or UnsupportedExport when CLIPModel cannot represent them."""
    cfg = model_config(loaded.model_name)
    vision = vision_spec(loaded.model, cfg, loaded.model_name, TARGET)
    return vision, text_spec(loaded.model, cfg, loaded.model_name, TARGET)


def export(loaded: LoadedCheckpoint, out: Path) -> list[str]:
    """Write the transformers folder; return the files written."""
    from transformers import CLIPImageProcessor, CLIPModel, CLIPProcessor, CLIPTokenizer

    cfg = model_config(loaded.model_name)
    model = loaded.model
    vision, text = check(loaded)
    sd = state_dict_for_export(model)
    hf_config = clip_config(vision, text, int(cfg["embed_dim"]), sd["logit_scale"].item())
    hf_model = CLIPModel(hf_config)
    hf_model.load_state_dict(convert_state_dict(sd, vision, text), strict=True)
    hf_model.save_pretrained(out, safe_serialization=True)

    vocab, merges = bpe_vocabulary()
    tokenizer = CLIPTokenizer(
        vocab=vocab,
        merges=merges,
        model_max_length=text.context_length,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=EOS,
    )
    size = vision.image_size
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_mean=[float(v) for v in model.visual.image_mean],
        image_std=[float(v) for v in model.visual.image_std],
        resample=3,  # bicubic, as open_clip
        do_center_crop=True,
        do_convert_rgb=True,
    )
    CLIPProcessor(image_processor=image_processor, tokenizer=tokenizer).save_pretrained(out)
    write_tokenizer_files(out, vocab, merges)
    return sorted(p.name for p in out.iterdir())


@torch.no_grad()
def verify(loaded: LoadedCheckpoint, out: Path, tolerance: float) -> Comparison:
    """Load the folder with transformers (offline) and compare embeddings with ours."""
    stay_offline()
    from transformers import CLIPModel, CLIPProcessor

    hf_model = CLIPModel.from_pretrained(out).eval()
    processor = CLIPProcessor.from_pretrained(out)
    images, texts = verification_batch(hf_model.config.vision_config.image_size)
    inputs = processor(
        text=texts, images=images, return_tensors="pt", padding=True, truncation=True
    )
    image = hf_model.get_image_features(pixel_values=inputs["pixel_values"]).pooler_output
    text = hf_model.get_text_features(
        input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]
    ).pooler_output
    ours_image, ours_text = our_embeddings(loaded, images, texts)
    cmp = Comparison(tolerance=tolerance)
    cmp.add("image", ours_image, torch.nn.functional.normalize(image, dim=-1))
    cmp.add("text", ours_text, torch.nn.functional.normalize(text, dim=-1))
    return cmp
