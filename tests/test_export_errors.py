"""Exports and checkpoints that cannot work fail early with a message that says why."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
    os.environ.setdefault(_var, "1")

import open_clip  # noqa: E402

from clipfnd.checkpoints import LoadedCheckpoint, load_checkpoint  # noqa: E402
from clipfnd.cli.main import main  # noqa: E402
from clipfnd.export import export_checkpoint, hf  # noqa: E402
from clipfnd.export.common import UnsupportedExport, VerificationError  # noqa: E402
from clipfnd.models.factory import ClipBundle  # noqa: E402

from checkpoints import write_checkpoint  # noqa: E402


def in_memory(name: str, model: torch.nn.Module | None = None) -> LoadedCheckpoint:
    """A LoadedCheckpoint around a freshly built model (no files: the check runs first)."""
    model = model if model is not None else open_clip.create_model(name)
    return LoadedCheckpoint(
        path=Path("/nowhere"),
        run_dir=None,
        step=0,
        epoch=0,
        model_name=name,
        config={},
        bundle=ClipBundle(model.eval(), None, None, None, name),
    )


@pytest.mark.parametrize("fmt", ["hf", "timm"])
def test_resnet_tower_is_refused_before_writing(tmp_path, fmt):
    out = tmp_path / "out"
    with pytest.raises(UnsupportedExport, match="ModifiedResNet image tower, not a ViT"):
        export_checkpoint(in_memory("RN50"), fmt, out)
    assert not out.exists()


def register(tmp_path: Path, name: str, vision: dict, text: dict) -> str:
    base_v = {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 16}
    base_t = {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1}
    cfg = {"embed_dim": 32, "vision_cfg": {**base_v, **vision}, "text_cfg": {**base_t, **text}}
    (tmp_path / f"{name}.json").write_text(json.dumps(cfg))
    open_clip.add_model_config(tmp_path / f"{name}.json")
    return name


def test_non_plain_towers_list_what_does_not_fit(tmp_path):
    name = register(
        tmp_path, "test-attnpool-vit", {"attentional_pool": True, "attn_pooler_heads": 2}, {}
    )
    with pytest.raises(UnsupportedExport, match=r"vision_cfg\.attentional_pool=True"):
        export_checkpoint(in_memory(name), "timm", tmp_path / "out")
    name = register(tmp_path, "test-lastpool-vit", {}, {"pool_type": "last"})
    with pytest.raises(UnsupportedExport, match=r"text_cfg\.pool_type='last'"):
        export_checkpoint(in_memory(name), "hf", tmp_path / "out")
    export_checkpoint(in_memory(name), "timm", tmp_path / "timm")  # its image tower is plain
    export_checkpoint(in_memory(name), "open_clip", tmp_path / "oc")  # open_clip takes anything
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "args, message",
    [
        (["--checkpoint", "{tmp}/missing"], "does not exist"),
        (["--checkpoint", "{tmp}"], "no checkpoint in"),
        (["--checkpoint", "{mismatch}"], "do not fit model 'clipfnd-small-vit'"),
    ],
)
def test_cli_export_errors_are_one_clear_line(tmp_path, capsys, args, message):
    fill = {
        "tmp": tmp_path,
        "mismatch": write_checkpoint(tmp_path / "run", "clipfnd-tiny-vit", "clipfnd-small-vit"),
    }
    rc = main(
        [
            "export",
            *[a.format(**fill) for a in args],
            "--format",
            "hf",
            "--out",
            str(tmp_path / "out"),
        ]
    )
    assert rc == 2
    err = capsys.readouterr().err
    assert err.startswith("clipfnd: error:") and message in err, err


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    return write_checkpoint(tmp_path_factory.mktemp("export") / "run")


def _unwritable(tmp_path: Path, shape: str, monkeypatch) -> tuple[Path, str]:
    """An ``--out`` of the given shape and what its one-line refusal says."""
    (tmp_path / "a_file").write_text("")
    if shape == "under a file":
        return tmp_path / "a_file" / "sub", "cannot write a folder there (Not a directory)"
    if shape == "a file":
        return tmp_path / "a_file", "exists and is not a folder"
    if shape == "unwritable place":  # refused even to root
        return Path("/proc/self/export"), "cannot write a folder there"
    readonly = tmp_path / "readonly"
    readonly.mkdir()
    readonly.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: the system's refusal is simulated
        for method in ("mkdir", "write_text"):
            real = getattr(Path, method)

            def refuse(self, *a, _real=real, **k):
                if readonly in self.parents:
                    raise PermissionError(13, "Permission denied", str(self))
                return _real(self, *a, **k)

            monkeypatch.setattr(Path, method, refuse)
    out = readonly / "export" if shape == "in a read-only folder" else readonly
    return out, "cannot write a folder there (Permission denied)"


@pytest.mark.parametrize(
    "shape",
    ["under a file", "a file", "unwritable place", "in a read-only folder", "a read-only folder"],
)
def test_cli_export_out_that_cannot_be_a_folder_is_one_line(
    tiny_run, tmp_path, capsys, monkeypatch, shape
):
    out, message = _unwritable(tmp_path, shape, monkeypatch)
    try:
        args = ["export", "--checkpoint", str(tiny_run), "--format", "open_clip"]
        rc = main([*args, "--out", str(out)])
    finally:
        if (tmp_path / "readonly").exists():
            (tmp_path / "readonly").chmod(0o755)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert err.startswith(f"clipfnd: error: --out {out}") and message in err, err
    assert err.count("\n") == 1, err


def test_mismatched_weights_name_the_shapes(tmp_path):
    run = write_checkpoint(tmp_path / "run", "clipfnd-tiny-vit", "clipfnd-small-vit")
    with pytest.raises(ValueError, match=r"shape mismatches, e\.g\. .*checkpoint \[") as e:
        load_checkpoint(run)
    assert "trainer_state.json" in str(e.value)


def test_out_dir_rules_and_failed_verification(tmp_path):
    run = write_checkpoint(tmp_path / "run", "clipfnd-tiny-vit", "clipfnd-tiny-vit")
    loaded = load_checkpoint(run)
    other = tmp_path / "not-an-export"
    other.mkdir()
    (other / "precious.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        export_checkpoint(loaded, "timm", other)
    with pytest.raises(ValueError, match="did not write"):
        export_checkpoint(loaded, "timm", other, overwrite=True)
    assert (other / "precious.txt").exists()

    out = export_checkpoint(loaded, "hf", tmp_path / "hf").out
    with pytest.raises(ValueError, match="not empty"):
        export_checkpoint(loaded, "hf", out)
    export_checkpoint(loaded, "hf", out, overwrite=True)  # an earlier export may be replaced

    # a damaged export fails verification with the size of the difference
    weights = safetensors.torch.load_file(str(out / "model.safetensors"))
    w = weights["visual_projection.weight"]
    noise = torch.randn(w.shape, generator=torch.Generator().manual_seed(0))
    weights["visual_projection.weight"] = w + 0.1 * noise
    safetensors.torch.save_file(weights, str(out / "model.safetensors"))
    cmp = hf.verify(loaded, out, tolerance=1e-4)
    assert not cmp.passed and cmp.diffs["text"] < 1e-4 < cmp.diffs["image"]
    with pytest.raises(VerificationError, match="max abs difference image"):
        cmp.check("hf")
