"""Pretrained starts through open_clip's own loading and the Hugging Face cache, offline: a
pretrained tag, ``hf-hub:org/repo``, ``local-dir:DIR`` and a file, each from a cache or folder
this test fills itself (no network), and a clear message for what is missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import open_clip
import pytest
import safetensors.torch
import torch

from clipfnd.errors import UserError
from clipfnd.models import create_clip, model_config

REPO = "clipfnd-test/tiny-vit"
COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _weights():
    torch.manual_seed(123)
    return {k: v.clone() for k, v in create_clip("clipfnd-tiny-vit").model.state_dict().items()}


def _open_clip_folder(folder, weights):
    """What open_clip reads for ``hf-hub:``/``local-dir:``: its config and safetensors weights."""
    folder.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": model_config("clipfnd-tiny-vit"), "preprocess_cfg": {}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    safetensors.torch.save_file(
        {k: v.contiguous() for k, v in weights.items()}, str(folder / "open_clip_model.safetensors")
    )


@pytest.fixture
def hf_cache(tmp_path, monkeypatch):
    """A Hugging Face hub cache holding REPO (the cache layout: refs/main -> snapshots/COMMIT),
    used offline."""
    weights = _weights()
    repo = tmp_path / "hub" / f"models--{REPO.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    _open_clip_folder(repo / "snapshots" / COMMIT, weights)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    import huggingface_hub.constants as c

    monkeypatch.setattr(c, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    return weights


def _same(model, weights):
    got = model.state_dict()
    assert set(got) == set(weights)
    for k, v in weights.items():
        assert torch.equal(got[k], v), k


def test_hf_hub_model_from_the_cache(hf_cache):
    _same(create_clip(f"hf-hub:{REPO}").model, hf_cache)


def test_pretrained_tag_from_the_cache(hf_cache, monkeypatch):
    from open_clip import pretrained as registry

    tags = dict(registry._PRETRAINED.get("clipfnd-tiny-vit", {}))
    tags["clipfnd_test"] = registry._pcfg(hf_hub=f"{REPO}/")
    monkeypatch.setitem(registry._PRETRAINED, "clipfnd-tiny-vit", tags)
    assert "clipfnd_test" in open_clip.list_pretrained_tags_by_model("clipfnd-tiny-vit")
    _same(create_clip("clipfnd-tiny-vit", pretrained="clipfnd_test").model, hf_cache)


def test_local_dir_and_file(tmp_path):
    weights = _weights()
    _open_clip_folder(tmp_path / "m", weights)
    _same(create_clip(f"local-dir:{tmp_path / 'm'}").model, weights)
    path = tmp_path / "m" / "open_clip_model.safetensors"
    _same(create_clip("clipfnd-tiny-vit", pretrained=str(path)).model, weights)


def test_what_is_missing_is_said(hf_cache):
    with pytest.raises(
        UserError, match=r"HF_HUB_OFFLINE is set and it is not in the Hugging Face cache"
    ) as e:
        create_clip("hf-hub:clipfnd-test/absent")
    assert "`hf download clipfnd-test/absent`" in str(e.value)
    with pytest.raises(UserError, match=r"its tags: .*laion2b_s34b_b79k"):
        create_clip("ViT-B-32", pretrained="no-such-tag")
    with pytest.raises(UserError, match="no such file"):
        create_clip("clipfnd-tiny-vit", pretrained="/nowhere/weights.pt")
    with pytest.raises(UserError, match="leave model.pretrained unset"):
        create_clip(f"hf-hub:{REPO}", pretrained="laion2b_s34b_b79k")
    with pytest.raises(UserError, match="local-dir"):
        create_clip("local-dir:/nonexistent/folder")


def test_a_cached_tag_that_is_missing_names_the_repo(hf_cache):
    # a real open_clip tag, never in this test's cache: offline, the message names the repo
    with pytest.raises(UserError, match=r"`hf download laion/CLIP-ViT-B-32-laion2B-s34B-b79K`"):
        create_clip("ViT-B-32", pretrained="laion2b_s34b_b79k")


def test_the_suggested_download_command_is_installed():
    """The miss message suggests huggingface_hub's ``hf`` CLI (2.x has no ``huggingface-cli``):
    it is installed beside this Python and has a ``download`` command."""
    hf = Path(sys.executable).parent / "hf"
    assert hf.is_file(), hf
    out = subprocess.run([str(hf), "download", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "REPO_ID" in out.stdout, out.stdout + out.stderr
