"""A ``model.pretrained`` file that is not weights (random bytes, a pickle that would run
code, a torch file holding something else, an empty file) is refused in one line naming the
file and what is expected, through ``create_clip`` and ``clipfnd train`` at start-up; nothing
in it is unpickled unrestricted. Good files, safetensors and torch (zip or legacy format),
still load."""

from __future__ import annotations

import os
import pickle
import random

import pytest
import safetensors.torch
import torch

from clipfnd.cli.main import main
from clipfnd.errors import UserError
from clipfnd.models import create_clip

EXPECTED = "expected a state dict as .safetensors, or a torch file loadable with weights_only=True"


class RunsCode:
    """Unpickling this runs a shell command that leaves a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _weights():
    torch.manual_seed(5)
    return {k: v.clone() for k, v in create_clip("clipfnd-tiny-vit").model.state_dict().items()}


def _bad_files(folder):
    """name -> (path, words the message names as the reason)."""
    folder.mkdir(parents=True, exist_ok=True)
    marker = folder / "code-ran"
    out = {}
    rng = random.Random(0)
    for suffix in (".pt", ".bin", ".safetensors"):
        path = folder / f"random{suffix}"
        path.write_bytes(rng.randbytes(4096))
        out[f"random{suffix}"] = path
    out["pickle.pkl"] = folder / "pickle.pkl"
    out["pickle.pkl"].write_bytes(pickle.dumps(RunsCode(marker)))
    out["torch_save_of_code.pt"] = folder / "torch_save_of_code.pt"
    torch.save({"w": RunsCode(marker)}, out["torch_save_of_code.pt"])
    out["list.pt"] = folder / "list.pt"
    torch.save([torch.zeros(2)], out["list.pt"])
    out["empty.pt"] = folder / "empty.pt"
    out["empty.pt"].write_bytes(b"")
    out["no_tensors.safetensors"] = folder / "no_tensors.safetensors"
    safetensors.torch.save_file({}, str(out["no_tensors.safetensors"]))
    return out, marker


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory):
    return _bad_files(tmp_path_factory.mktemp("bad"))


CASES = [
    "random.pt",
    "random.bin",
    "random.safetensors",
    "pickle.pkl",
    "torch_save_of_code.pt",
    "list.pt",
    "empty.pt",
    "no_tensors.safetensors",
]


@pytest.mark.parametrize("case", CASES)
def test_create_clip_refuses_a_file_that_is_not_weights_in_one_line(bad_files, case):
    files, marker = bad_files
    path = files[case]
    with pytest.raises(UserError) as e:
        create_clip("clipfnd-tiny-vit", pretrained=str(path))
    msg = str(e.value)
    assert "\n" not in msg and str(path) in msg and EXPECTED in msg, msg
    assert not marker.exists()  # the pickle's code never ran


def test_the_train_cli_refuses_it_at_start_up(shapes, bad_files, tmp_path, capsys):
    files, marker = bad_files
    for case in ("random.pt", "pickle.pkl", "torch_save_of_code.pt"):
        run = tmp_path / case / "run"
        rc = main(
            [
                "train",
                "configs/demo.yaml",
                f"output_dir={run}",
                f"data.train={shapes / 'train'}",
                f"data.val={shapes / 'val'}",
                f"model.pretrained={files[case]}",
                "data.num_workers=0",
                "train.progress=false",
                "train.report_to=none",
            ]
        )
        err = capsys.readouterr().err
        lines = err.strip().splitlines()
        assert rc == 2 and len(lines) == 1, err
        assert lines[0].startswith("clipfnd: error: ") and str(files[case]) in lines[0], err
        assert EXPECTED in lines[0] and not run.exists()
    assert not marker.exists()


def test_a_local_dir_with_bad_weights_is_one_line(tmp_path):
    """``local-dir:`` weights go through open_clip's own loading (weights_only=True)."""
    import json

    from clipfnd.models import model_config

    folder = tmp_path / "m"
    folder.mkdir()
    cfg = {"model_cfg": model_config("clipfnd-tiny-vit"), "preprocess_cfg": {}}
    (folder / "open_clip_config.json").write_text(json.dumps(cfg))
    (folder / "open_clip_pytorch_model.bin").write_bytes(pickle.dumps(RunsCode(folder / "ran")))
    with pytest.raises(UserError) as e:
        create_clip(f"local-dir:{folder}")
    assert "\n" not in str(e.value) and EXPECTED in str(e.value), str(e.value)
    assert not (folder / "ran").exists()


@pytest.mark.parametrize("fmt", ["safetensors", "zip", "legacy", "checkpoint"])
def test_good_weights_files_still_load(tmp_path, fmt):
    weights = _weights()
    path = tmp_path / ("w.safetensors" if fmt == "safetensors" else "w.pt")
    if fmt == "safetensors":
        safetensors.torch.save_file({k: v.contiguous() for k, v in weights.items()}, str(path))
    elif fmt == "checkpoint":  # open_clip's training checkpoint: the weights under state_dict
        torch.save({"epoch": 3, "name": "run", "state_dict": weights}, path)
    else:
        torch.save(weights, path, _use_new_zipfile_serialization=fmt == "zip")
    got = create_clip("clipfnd-tiny-vit", pretrained=str(path)).model.state_dict()
    assert set(got) == set(weights)
    assert all(torch.equal(got[k], v) for k, v in weights.items())
