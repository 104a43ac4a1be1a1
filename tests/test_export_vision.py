"""Exporting the backbone of a vision-only (``mode: simclr``) checkpoint: torchvision and timm.

Checkpoints are random-initialised ``SimCLRModel``s (batch-norm statistics randomised, so
that eval-mode features depend on them) written as the trainer writes them.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch
from torch import nn

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

from clipfnd.checkpoints import load_checkpoint  # noqa: E402
from clipfnd.cli.main import main  # noqa: E402
from clipfnd.export import FORMATS, _format_module, export_checkpoint  # noqa: E402
from clipfnd.export import timm as timm_format  # noqa: E402
from clipfnd.export.common import EXPORT_RECORD, UnsupportedExport, verification_batch  # noqa: E402
from clipfnd.models.vision import vision_from_config  # noqa: E402

from checkpoints import write_checkpoint  # noqa: E402

IMAGE_SIZE = 32
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def vision_config(name: str, small_images: bool = False) -> dict:
    return {
        "mode": "simclr",
        "model": {"name": name, "proj_hidden": 32, "proj_dim": 16, "small_images": small_images},
        "data": {"image_size": IMAGE_SIZE},
    }


def write_vision_checkpoint(run: Path, name: str, small_images: bool = False, step: int = 5):
    """``RUN/checkpoints/step_N`` as the trainer writes it, for a fresh seeded SimCLRModel."""
    config = vision_config(name, small_images)
    torch.manual_seed(0)
    model = vision_from_config(config).model
    with torch.no_grad():  # batch-norm statistics and affine parameters away from the init
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.2, 0.2)
    ckpt = run / "checkpoints" / f"step_{step:08d}"
    ckpt.mkdir(parents=True)
    safetensors.torch.save_file(model.state_dict(), str(ckpt / "model.safetensors"))
    (ckpt / "optimizer.bin").write_bytes(b"training state")  # must not be exported
    state = {"step": step, "epoch": 0, "world_size": 1, "model_name": name, "config": config}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    return run


BACKBONES = {
    "resnet18": ("resnet18", False),
    "resnet18-small": ("resnet18", True),
    "tiny": ("tiny", False),
    "vit": ("clipfnd-tiny-vit", False),  # an open_clip image tower
}


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("vision")
    return {
        key: load_checkpoint(write_vision_checkpoint(root / key, name, small))
        for key, (name, small) in BACKBONES.items()
    }


@torch.no_grad()
def checkpoint_features(loaded_ckpt) -> torch.Tensor:
    """``model.features`` in eval mode on the verification batch, with clipfnd's transform."""
    model = loaded_ckpt.model.eval()
    images, _ = verification_batch(IMAGE_SIZE)
    return model.features(torch.stack([loaded_ckpt.bundle.preprocess_val(im) for im in images]))


def plain_transform(mean, std):
    from torchvision.transforms import v2

    return v2.Compose(
        [
            v2.ToImage(),
            v2.Resize(IMAGE_SIZE, antialias=True),
            v2.CenterCrop(IMAGE_SIZE),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(mean, std),
        ]
    )


@torch.no_grad()
def features_of(net: nn.Module, mean=MEAN, std=STD) -> torch.Tensor:
    images, _ = verification_batch(IMAGE_SIZE)
    transform = plain_transform(mean, std)
    return net.eval()(torch.stack([transform(im) for im in images]))


def test_torchvision_is_a_format():
    assert "torchvision" in FORMATS


@pytest.mark.parametrize("key", list(BACKBONES))
def test_torchvision_export_rebuilds_from_the_files_alone(key, loaded, tmp_path):
    ckpt = loaded[key]
    name, small = BACKBONES[key]
    result = export_checkpoint(ckpt, "torchvision", tmp_path / "out", verify=True)
    out = result.out
    assert result.comparison.passed and result.comparison.max_abs_diff <= 1e-5
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["backbone.safetensors", "backbone.json", "README.md", EXPORT_RECORD]
    )
    spec = json.loads((out / "backbone.json").read_text())
    assert spec["architecture"] == name
    assert spec["small_images"] is small
    assert spec["feature_dim"] == ckpt.model.feature_dim
    assert spec["image_size"] == IMAGE_SIZE
    assert tuple(spec["mean"]) == MEAN and tuple(spec["std"]) == STD
    record = json.loads((out / EXPORT_RECORD).read_text())
    assert record["format"] == "torchvision" and record["config"]["mode"] == "simclr"
    assert record["verify"]["passed"]

    # only the backbone, as safetensors (no pickle, no projection head or temperature)
    weights = safetensors.torch.load_file(str(out / "backbone.safetensors"))
    assert set(weights) == set(ckpt.model.backbone.state_dict())

    # rebuilt the way the README says (torchvision for ResNets, clipfnd's builder for tiny)
    if not name.startswith("resnet"):
        from clipfnd.models.vision import backbone

        assert spec["builder"] == "clipfnd.models.vision.backbone"
        net, dim = backbone(name, spec["small_images"])
        assert dim == spec["feature_dim"]
    else:
        import torchvision

        assert spec["builder"] == "torchvision.models.resnet18"
        readme = (out / "README.md").read_text()
        assert "torchvision.models.resnet18(weights=None)" in readme
        assert "nn.Identity()" in readme
        assert ("model.maxpool = nn.Identity()" in readme) is small
        net = torchvision.models.resnet18(weights=None)
        if small:
            net.conv1 = nn.Conv2d(3, 64, 3, stride=1, padding=1, bias=False)
            net.maxpool = nn.Identity()
        net.fc = nn.Identity()
    net.load_state_dict(weights, strict=True)
    theirs = features_of(net, spec["mean"], spec["std"])
    torch.testing.assert_close(theirs, checkpoint_features(ckpt), atol=1e-5, rtol=0)


def test_timm_export_of_a_resnet(loaded, tmp_path):
    import timm

    ckpt = loaded["resnet18"]
    result = export_checkpoint(ckpt, "timm", tmp_path / "out", verify=True)
    out = result.out
    assert result.comparison.passed
    assert {"config.json", "model.safetensors", EXPORT_RECORD} <= set(result.files)
    assert not (out / "optimizer.bin").exists()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "resnet18" and cfg["num_classes"] == 0
    assert cfg["pretrained_cfg"]["input_size"] == [3, IMAGE_SIZE, IMAGE_SIZE]
    assert tuple(cfg["pretrained_cfg"]["mean"]) == MEAN
    assert cfg["pretrained_cfg"]["tag"] == "clipfnd"
    assert "hf_hub_id" not in cfg["pretrained_cfg"] and "url" not in cfg["pretrained_cfg"]

    ours = checkpoint_features(ckpt)
    local = timm.create_model(f"local-dir:{out}", pretrained=True)
    torch.testing.assert_close(features_of(local), ours, atol=1e-5, rtol=0)
    # and by architecture name, with the weights file
    by_name = timm.create_model(
        "resnet18",
        pretrained=True,
        num_classes=0,
        pretrained_cfg_overlay=dict(file=str(out / "model.safetensors")),
    )
    torch.testing.assert_close(features_of(by_name), ours, atol=1e-5, rtol=0)


def test_timm_export_of_an_open_clip_tower_keeps_its_projection(loaded, tmp_path):
    import timm

    ckpt = loaded["vit"]
    result = export_checkpoint(ckpt, "timm", tmp_path / "out", verify=True)
    assert result.comparison.passed
    model = timm.create_model(f"local-dir:{result.out}", pretrained=True)
    assert model.num_classes == ckpt.model.feature_dim  # the tower's projection, as timm's head
    torch.testing.assert_close(features_of(model), checkpoint_features(ckpt), atol=1e-5, rtol=0)


@pytest.mark.parametrize(
    "key, reason", [("resnet18-small", "small_images=True"), ("tiny", "'tiny'")]
)
def test_timm_refuses_backbones_it_cannot_rebuild(key, reason, loaded, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UnsupportedExport, match="use --format torchvision") as e:
        export_checkpoint(loaded[key], "timm", out)
    assert reason in str(e.value)
    assert not out.exists()


@pytest.mark.parametrize("fmt", ["open_clip", "hf"])
def test_two_tower_formats_refuse_a_vision_checkpoint(fmt, loaded, tmp_path):
    out = tmp_path / "out"
    with pytest.raises(UnsupportedExport, match="no text tower; use --format timm or torchvision"):
        export_checkpoint(loaded["resnet18"], fmt, out)
    assert not out.exists()


def test_cli_exports_and_refuses_in_one_line(loaded, tmp_path, capsys):
    run = loaded["tiny"].run_dir
    out = tmp_path / "tv"
    argv = ["export", "--checkpoint", str(run), "--format", "torchvision", "--out", str(out)]
    rc = main([*argv, "--verify"])
    assert rc == 0
    assert "verify: passed" in capsys.readouterr().out
    assert (out / "backbone.safetensors").is_file()

    rc = main(["export", "--checkpoint", str(run), "--format", "hf", "--out", str(tmp_path / "h")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "no text tower" in err
    assert not (tmp_path / "h").exists()


def test_clip_checkpoints_keep_their_formats_and_refuse_torchvision(tmp_path):
    clip = load_checkpoint(write_checkpoint(tmp_path / "run", "clipfnd-tiny-vit"))
    assert _format_module("timm", clip) is timm_format
    out = tmp_path / "out"
    with pytest.raises(UnsupportedExport, match="vision-only"):
        export_checkpoint(clip, "torchvision", out)
    assert not out.exists()
