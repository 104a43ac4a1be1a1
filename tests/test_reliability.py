"""Bad data, numerical faults and misconfiguration: skipped and counted, or refused with a
message; never a hang (every launch has a timeout)."""

from __future__ import annotations

import io
import json
import os
import random
import shutil
import tarfile
from pathlib import Path

import pytest
import torch
import torchvision.transforms as T
from PIL import Image

from data_pipelines import load_shard_set
from data_pipelines.loader import ShardStream
from data_pipelines.shards import iter_tar_samples

from runs import launch, write_config

pytestmark = [pytest.mark.slow]


def rewrite(path: Path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tf:
        for s in samples:
            for ext, data in s.items():
                if ext.startswith("__"):
                    continue
                info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                info.size = len(data)
                tf.addfile(info, io.BytesIO(data))


@pytest.fixture
def bad_shapes(shapes, tmp_path):
    """The train split with one of each fault, in shards of its own. The manifest still
    claims the original counts, as it would after damage on disk."""
    root = tmp_path / "bad"
    shutil.copytree(shapes, root)
    train = root / "train"
    truncated = train / "shard-000001.tar"
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    p = train / "shard-000002.tar"
    samples = list(iter_tar_samples(str(p)))
    samples[0]["jpg"] = b"\xff\xd8\xff garbage"
    samples[1]["jpg"] = b""
    del samples[2]["txt"]
    samples[3]["json"] = json.dumps({"index": 10**6}).encode()
    samples[4]["json"] = json.dumps({"index": json.loads(samples[5]["json"])["index"]}).encode()
    rewrite(p, samples)
    return root


def test_bad_data_is_skipped_counted_and_reported_under_2x2(bad_shapes, tmp_path):
    run = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml",
        bad_shapes,
        run,
        {"data.num_workers": 2, "train.epochs": 1, "eval.at_end": False},
    )
    proc = launch(cfg, timeout=300)
    summary = json.loads((run / "summary.json").read_text())
    # 5 bad samples in shard 2; the truncated shard 1 adds a read error and a cut sample
    assert summary["skipped_samples"] >= 6
    log = proc.stderr
    for reason in (
        "unreadable image",
        "zero-byte image",
        "empty caption",
        "out of range",
        "duplicate dataset index",
    ):
        assert reason in log, reason
    assert "shard-000002.tar" in log and "shard-000001.tar" in log
    assert "skipped" in log and "bad samples" in log  # the per-shard epoch report


def test_bad_data_stops_with_a_message_under_on_error_raise(bad_shapes, tmp_path):
    cfg = write_config(
        tmp_path / "c.yaml",
        bad_shapes,
        tmp_path / "run",
        {"data.num_workers": 2, "data.on_error": "raise", "eval.at_end": False},
    )
    proc = launch(cfg, timeout=300, expect_ok=False)
    assert proc.returncode != 0
    assert "shard-00000" in proc.stderr and (
        "bad sample" in proc.stderr or "cannot read shard" in proc.stderr
    )


def test_missing_shard_and_indivisible_batch_are_refused_at_start(shapes, tmp_path, capsys):
    from clipfnd.cli.main import main

    root = tmp_path / "missing"
    shutil.copytree(shapes, root)
    (root / "train" / "shard-000003.tar").unlink()
    cfg = write_config(tmp_path / "c.yaml", root, tmp_path / "run")
    assert main(["train", str(cfg)]) == 2
    assert "shard-000003.tar is listed" in capsys.readouterr().err
    cfg = write_config(tmp_path / "d.yaml", shapes, tmp_path / "run2", {"data.batch_size": 63})
    proc = launch(cfg, processes=2, timeout=120, expect_ok=False)
    assert (
        proc.returncode != 0
        and "data.batch_size=63 (the global batch, all processes together; open_clip's --batch-size is per GPU) does not divide by 2"
        in proc.stderr
    )


def test_non_finite_steps_are_skipped_then_the_run_stops(shapes, tmp_path):
    """An absurd learning rate blows the weights up after the first step: the next steps are
    skipped, and after train.max_nonfinite_steps in a row the run stops with a checkpoint."""
    run = tmp_path / "run"
    cfg = write_config(
        tmp_path / "c.yaml",
        shapes,
        run,
        {
            "optim.lr": 1e30,
            "optim.warmup_steps": 0,
            "optim.grad_clip": None,
            "train.max_nonfinite_steps": 3,
            "train.checkpoint_every": 100,
            "data.num_workers": 0,
        },
    )
    proc = launch(cfg, processes=1, timeout=200, expect_ok=False)
    assert proc.returncode == 3, proc.stderr[-3000:]
    assert "3 optimiser steps in a row had a non-finite loss or gradient" in proc.stderr
    assert "step skipped" in proc.stderr
    ckpts = sorted((run / "checkpoints").iterdir())
    assert ckpts, "a checkpoint from before the fault is kept"
    state = json.loads((ckpts[-1] / "trainer_state.json").read_text())
    assert state["step"] >= 1


# --- fuzz -------------------------------------------------------------------------------------
def blank_tokens(captions: list[str]) -> torch.Tensor:
    """A tokenizer stand-in (module level: loader workers receive it pickled)."""
    return torch.zeros(len(captions), 4, dtype=torch.long)


def _jpeg(rng: random.Random) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), tuple(rng.randrange(256) for _ in range(3))).save(buf, format="JPEG")
    return buf.getvalue()


@pytest.mark.parametrize("num_workers", [0, 2])
def test_fuzz_random_bytes_and_strings_are_counted_never_crash(tmp_path, num_workers):
    rng = random.Random(1234)
    n_shards, per_shard = 4, 60
    shards = []
    for k in range(n_shards):
        samples = []
        for i in range(per_shard):
            n = k * per_shard + i
            s = {
                "__key__": f"{n:09d}",
                "json": json.dumps({"index": n, "label": rng.randrange(5)}).encode(),
            }
            kind = rng.randrange(6)
            s["jpg"] = _jpeg(rng) if kind in (0, 1) else rng.randbytes(rng.randrange(0, 300))
            s["txt"] = "".join(
                chr(rng.randrange(32, 0x2FFF)) for _ in range(rng.randrange(0, 40))
            ).encode()
            if kind == 1:
                s["json"] = rng.randbytes(rng.randrange(1, 30))  # unreadable metadata
            samples.append(s)
        path = tmp_path / f"shard-{k:06d}.tar"
        rewrite(path, samples)
        shards.append({"file": path.name, "num_samples": per_shard})
    (tmp_path / "manifest.json").write_text(
        json.dumps(
            {
                "format": "clipfnd-shards",
                "version": 1,
                "num_samples": n_shards * per_shard,
                "num_shards": n_shards,
                "shards": shards,
                "label_names": None,
                "num_labels": 0,
                "skipped": {},
                "meta": {},
            }
        )
    )
    ss = load_shard_set(tmp_path)
    stream = ShardStream(
        ss,
        global_batch_size=1,
        image_transform=T.Compose([T.Resize((8, 8)), T.ToTensor()]),
        tokenize=blank_tokens,
        num_workers=num_workers,
        seed=0,
        shuffle_buffer=10,
        chunk_size=7,
    )
    it = stream.epoch(0)
    good = sum(1 for _ in it)
    bad = sum(it.bad.values())
    assert good + bad == n_shards * per_shard
    assert good > 0 and bad > 0


# --- shards that are no shards, manifests that lie about their form ----------------------------
def _copy_split(shapes, tmp_path):
    root = tmp_path / "split"
    shutil.copytree(shapes / "train", root)
    return root


def test_a_fifo_or_folder_in_place_of_a_shard_is_refused_at_start(shapes, tmp_path):
    from data_pipelines import DataError, load_shard_set

    root = _copy_split(shapes, tmp_path)
    shard = sorted(root.glob("shard-*.tar"))[1]
    shard.unlink()
    os.mkfifo(shard)  # reading it would block forever
    with pytest.raises(DataError, match=f"shard {shard} is not a regular file"):
        load_shard_set(root)
    shard.unlink()
    shard.write_bytes(b"x" * 100)
    with pytest.raises(DataError, match="100 bytes, too few for a tar"):
        load_shard_set(root)


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda m: m.pop("shards"), "lists no shards"),
        (lambda m: m["shards"][0].update(num_samples="many"), "num_samples='many'"),
        (lambda m: m["shards"][0].update(num_samples=-500), "num_samples=-500"),
        (lambda m: m["shards"][0].pop("file"), 'has no "file" name'),
    ],
)
def test_a_malformed_manifest_is_refused_naming_it(shapes, tmp_path, edit, message):
    from data_pipelines import DataError, load_shard_set

    root = _copy_split(shapes, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    edit(manifest)
    (root / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match=message):
        load_shard_set(root)


@pytest.mark.parametrize("delta", [+40, -10])
def test_a_manifest_whose_counts_lie_is_caught_by_the_loader_and_by_verify(
    shapes, tmp_path, delta, capsys
):
    """Counts too high (the schedule would be planned for samples that do not exist) or too
    low: under on_error=raise the loader stops naming the shard and both counts; under skip
    the mismatch is a counted fault; `clipfnd data verify` lists it and exits 1."""
    from clipfnd.cli.main import main
    from data_pipelines import DataError

    root = _copy_split(shapes, tmp_path)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["shards"][0]["num_samples"] += delta
    manifest["num_samples"] = sum(s["num_samples"] for s in manifest["shards"])
    (root / "manifest.json").write_text(json.dumps(manifest))
    shard = str(root / manifest["shards"][0]["file"])
    want = f"manifest says {64 + delta} samples, the shard holds 64"

    def stream(on_error):
        return ShardStream(
            load_shard_set(root),
            global_batch_size=32,
            image_transform=T.ToTensor(),
            tokenize=blank_tokens,
            num_workers=0,
            shuffle_buffer=0,
            on_error=on_error,
        )

    with pytest.raises(DataError, match=f"{shard}: {want}"):
        for _ in stream("raise").epoch(0):
            pass
    it = stream("skip").epoch(0)
    for _ in it:
        pass
    assert it.bad[(shard, "sample count")] == 1, it.bad  # the details go to the warning

    assert main(["data", "verify", str(root)]) == 1
    out = capsys.readouterr().out
    assert f"problem: {shard}: {want}" in out and "FAILED" in out
    assert main(["data", "verify", str(shapes / "train")]) == 0


def test_each_epoch_reports_what_became_of_its_samples(shapes, tmp_path, caplog):
    """A shard of random bytes holds 64 samples: they show up as not used (with the read
    error skipped and counted), and used + skipped + not used is the dataset."""
    from clipfnd.config import load_config
    from clipfnd.train.loop import train

    root = _copy_split(shapes, tmp_path)
    shard = sorted(root.glob("shard-*.tar"))[2]
    shard.write_bytes(random.Random(0).randbytes(shard.stat().st_size))
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path / 'run'}",
            f"data.train={root}",
            "data.num_workers=0",
            "data.batch_size=64",
            "train.epochs=2",
            "train.progress=false",
            "train.report_to=none",
            "train.plots=false",
            "eval.at_end=false",
        ],
    )
    with caplog.at_level("WARNING"):
        train(cfg)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    epochs = [r for r in lines if "data/used" in r]
    assert [r["epoch"] for r in epochs] == [0, 1]
    for r in epochs:
        assert r["data/used"] + r["data/skipped"] + r["data/not_used"] == 512
        assert r["data/used"] <= 448 and r["data/skipped"] >= 1
        assert r["data/skipped"] + r["data/not_used"] >= 64  # the shard's 64 are lost
    assert "manifest says 64 samples, the shard holds 0" in caplog.text
    assert "samples used" in caplog.text and "not used" in caplog.text
