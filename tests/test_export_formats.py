"""Exports load through open_clip, transformers and timm and reproduce our embeddings.

Both of clipfnd's configs are covered (different widths, heads, patch and image sizes, text
contexts). Checkpoints are random-initialised models written as training writes them.
"""

from __future__ import annotations

import json
import os

import pytest
import torch

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import open_clip  # noqa: E402

from clipfnd.checkpoints import load_checkpoint  # noqa: E402
from clipfnd.cli.main import main  # noqa: E402
from clipfnd.export import export_checkpoint  # noqa: E402
from clipfnd.export.common import EXPORT_RECORD, our_embeddings, verification_batch  # noqa: E402
from clipfnd.models.factory import model_config  # noqa: E402

from checkpoints import write_checkpoint  # noqa: E402

MODELS = ("clipfnd-tiny-vit", "clipfnd-small-vit")
TRAINING_ONLY = ("optimizer.bin", "tables.safetensors", "scheduler.json", "loader_rank0.json")
# a logit scale that differs from the init (to see it carried over), training-only files that
# must not be exported, and a step/epoch/config to find in the export record
CHECKPOINT = dict(
    step=7, epoch=1, logit_scale=3.3, extra_files=TRAINING_ONLY, config={"optim": {"lr": 0.001}}
)


@pytest.fixture(scope="module", params=MODELS)
def exported(request, tmp_path_factory) -> dict:
    name = request.param
    root = tmp_path_factory.mktemp(name)
    run = write_checkpoint(root / "run", name, **CHECKPOINT)
    loaded = load_checkpoint(run)
    dirs = {}
    for fmt in ("open_clip", "hf", "timm"):
        dirs[fmt] = export_checkpoint(loaded, fmt, root / fmt).out
    return {"name": name, "loaded": loaded, "run": run, **dirs}


def test_open_clip_local_dir_and_state_dict_give_identical_embeddings(exported):
    loaded, out = exported["loaded"], exported["open_clip"]
    cfg = json.loads((out / "open_clip_config.json").read_text())
    assert cfg["model_cfg"] == model_config(exported["name"])
    assert cfg["preprocess_cfg"]["size"] == list(loaded.model.visual.preprocess_cfg["size"])
    images, texts = verification_batch(cfg["model_cfg"]["vision_cfg"]["image_size"])
    ours = our_embeddings(loaded, images, texts)

    model, _, preprocess = open_clip.create_model_and_transforms(f"local-dir:{out}")
    tokenizer = open_clip.get_tokenizer(f"local-dir:{out}")
    model.eval()
    with torch.no_grad():
        image = model.encode_image(torch.stack([preprocess(i) for i in images]), normalize=True)
        text = model.encode_text(tokenizer(texts), normalize=True)
    assert torch.equal(image, ours[0]) and torch.equal(text, ours[1])
    assert model.logit_scale.item() == pytest.approx(3.3)

    model = open_clip.create_model(
        exported["name"], pretrained=str(out / "open_clip_pytorch_model.bin")
    )
    for k, v in loaded.model.state_dict().items():
        assert torch.equal(model.state_dict()[k], v), k


def test_transformers_loads_offline_and_matches(exported):
    from transformers import CLIPModel, CLIPProcessor, CLIPTokenizer

    loaded, out = exported["loaded"], exported["hf"]
    assert (out / "vocab.json").is_file() and (out / "merges.txt").is_file()
    model = CLIPModel.from_pretrained(out).eval()
    processor = CLIPProcessor.from_pretrained(out)
    tokenizer = CLIPTokenizer.from_pretrained(out)
    size = model.config.vision_config.image_size
    assert size == loaded.model.visual.preprocess_cfg["size"][0]
    images, texts = verification_batch(size)
    ours_image, ours_text = our_embeddings(loaded, images, texts)

    tokens = tokenizer(texts, padding=True, truncation=True, return_tensors="pt")
    ref = loaded.bundle.tokenizer(texts)
    for row, ids in zip(ref, tokens["input_ids"], strict=True):  # ids agree up to EOT
        n = int((row != 0).sum())
        assert row[:n].tolist() == ids[:n].tolist()
    pixels = processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        image = model.get_image_features(pixel_values=pixels).pooler_output
        text = model.get_text_features(**tokens).pooler_output
    image = torch.nn.functional.normalize(image, dim=-1)
    text = torch.nn.functional.normalize(text, dim=-1)
    assert (image - ours_image).abs().max().item() < 1e-4
    assert (text - ours_text).abs().max().item() < 1e-4
    assert model.logit_scale.item() == pytest.approx(3.3)


def test_timm_features_equal_open_clip_before_projection(exported):
    import timm

    loaded = exported["loaded"]
    model = timm.create_model(f"local-dir:{exported['timm']}", pretrained=True).eval()
    assert model.num_classes == 0
    size = loaded.model.visual.preprocess_cfg["size"][0]
    x = torch.randn(3, 3, size, size, generator=torch.Generator().manual_seed(0))
    visual = loaded.model.visual
    with torch.no_grad():
        theirs = model(x)
        pooled = visual(x)  # with the projection
        proj, visual.proj = visual.proj, None
        try:
            ours = visual(x)
        finally:
            visual.proj = proj
    assert theirs.shape[-1] == visual.transformer.width
    assert torch.allclose(theirs, ours, atol=1e-5)
    assert torch.allclose(ours @ proj, pooled, atol=1e-5)


def test_exports_record_source_and_hold_no_training_state(exported):
    for fmt in ("open_clip", "hf", "timm"):
        out = exported[fmt]
        record = json.loads((out / EXPORT_RECORD).read_text())
        assert record["format"] == fmt
        assert record["source"]["step"] == 7 and record["source"]["epoch"] == 1
        assert record["source"]["model_name"] == exported["name"]
        assert record["source"]["checkpoint"].endswith("step_00000007")
        assert record["config"]["optim"] == {"lr": 0.001}
        names = {p.name for p in out.iterdir()}
        assert not names & set(TRAINING_ONLY), names
        assert not any(n.endswith(".pkl") for n in names)


def test_cli_export_verify_prints_differences(tmp_path, capsys):
    run = write_checkpoint(tmp_path / "run", MODELS[0], **CHECKPOINT)
    for fmt in ("open_clip", "hf", "timm"):
        rc = main(
            [
                "export",
                "--checkpoint",
                str(run),
                "--format",
                fmt,
                "--out",
                str(tmp_path / fmt),
                "--verify",
            ]
        )
        assert rc == 0
        printed = capsys.readouterr().out
        assert "max abs diff" in printed and "passed" in printed
        record = json.loads((tmp_path / fmt / EXPORT_RECORD).read_text())
        assert record["verify"]["passed"] is True
        assert max(record["verify"]["max_abs_diff"].values()) <= 1e-4
