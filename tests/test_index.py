"""``clipfnd data index``: img2dataset-shaped shards read in place.

The shards are written by the test (``clipfnd.testing.shards``): keys like ``000010023``,
``.jpg``/``.txt``/``.json`` with url, caption and status, failed downloads without an image,
empty captions, zero-byte images, and a ``_stats.json`` per shard. Every usable sample's
``.json`` carries ``class = expected index % 13``, so each batch shows whether the loader gave
every sample the index it should have.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import shutil
import tarfile
from pathlib import Path

import pytest
import torch

from clipfnd.testing.shards import CLASSES, write_shards
from data_pipelines import DataError, load_shard_set
from data_pipelines.index import expand_sources, index_shards
from data_pipelines.loader import LoaderState
from data_pipelines.loader.worker import RankStream, _ErrorLog

from test_data import stream as data_stream

SHARDS, PER_SHARD = 4, 48  # 36 usable per shard (12 made unusable), 144 in all


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("img2dataset")
    assert write_shards(root / "cc", SHARDS, PER_SHARD) == 144
    index_shards(
        [str(root / "cc")], root / "cc.json", label_field="class", progress=False, workers=1
    )
    return root


def stream(ss, **kw):
    """The loader as test_data drives it, with batches of 24 and no worker processes."""
    args = dict(global_batch_size=24, num_workers=0, seed=3, shuffle_buffer=20, chunk_size=5)
    return data_stream(ss, **(args | kw))


def test_the_manifest_counts_offsets_keys_and_skips(shards):
    m = json.loads((shards / "cc.json").read_text())
    assert m["in_place"] and m["num_samples"] == 144 and m["num_shards"] == SHARDS
    assert [s["file"] for s in m["shards"]] == [f"cc/{i:05d}.tar" for i in range(SHARDS)]
    assert [s["offset"] for s in m["shards"]] == [0, 36, 72, 108]
    assert {s["num_raw"] for s in m["shards"]} == {48}
    assert m["skipped"] == {"empty caption": 16, "failed entry": 16, "zero-byte image": 16}
    assert m["shards"][0]["keys"] == {"jpg": 44, "json": 48, "txt": 48}
    assert m["cross_check"] == []  # agrees with every _stats.json
    assert m["label_names"] == [str(i) for i in range(CLASSES)] and m["unlabelled"] == 0
    ss = load_shard_set(shards / "cc.json")
    assert ss.in_place and ss.num_samples == 144 and ss.num_labels == CLASSES


def test_img2dataset_counts_are_a_cross_check_only(shards, tmp_path):
    shutil.copytree(shards / "cc", tmp_path / "cc")
    stats = tmp_path / "cc" / "00001_stats.json"
    stats.write_text(json.dumps({"successes": 40, "count": 48}))
    m = index_shards([str(tmp_path / "cc")], tmp_path / "m.json", progress=False, workers=1)
    assert m["num_samples"] == 144  # the shards decide
    assert m["cross_check"] == [
        f"{tmp_path / 'cc' / '00001.tar'}: 00001_stats.json says 40 successes, "
        "the shard holds 44 samples with an image"
    ]


@pytest.mark.parametrize("world,num_workers", [(1, 0), (2, 0), (2, 2)])
def test_every_usable_sample_is_seen_once_per_epoch_with_its_index(shards, world, num_workers):
    ss = load_shard_set(shards / "cc.json")
    for epoch in (0, 1):
        seen = collections.Counter()
        for rank in range(world):
            s = stream(ss, rank=rank, world=world, num_workers=num_workers)
            steps = 0
            for batch in s.epoch(epoch):
                assert torch.equal(batch["label"], batch["index"] % CLASSES)
                seen.update(batch["index"].tolist())
                steps += 1
            assert steps == 144 // 24
        assert sorted(seen) == list(range(144)) and set(seen.values()) == {1}


def test_resume_mid_epoch_is_exact(shards):
    ss = load_shard_set(shards / "cc.json")
    s = stream(ss, rank=1, world=2)
    full = list(s.epoch(1))
    it = s.epoch(1)
    head = []
    for batch in it:
        head.append(batch)
        if len(head) == 2:
            break
    state = LoaderState.from_dict(json.loads(json.dumps(it.state().to_dict())))
    rest = list(stream(ss, rank=1, world=2).epoch(1, state))
    assert len(head) + len(rest) == len(full)
    for a, b in zip(head + rest, full):
        for key in ("index", "label", "text", "image"):
            assert torch.equal(a[key], b[key]), key


def _rename_first_member(shard: Path) -> None:
    """Upper-case the last letter of the first member's name, in place (same size, a valid
    header checksum): the shard's bytes change, its size does not."""
    with tarfile.open(shard) as tar:
        at = tar.next().offset_data - 512  # the member's own header (after any pax header)
    data = bytearray(shard.read_bytes())
    end = data.index(b"\0", at)
    data[end - 1 : end] = bytes([data[end - 1]]).upper()
    data[at + 148 : at + 156] = b" " * 8
    data[at + 148 : at + 156] = b"%06o\0 " % sum(data[at : at + 512])
    shard.write_bytes(bytes(data))


def test_a_shard_changed_after_indexing_is_refused(shards, tmp_path):
    shutil.copytree(shards / "cc", tmp_path / "cc")
    index_shards([str(tmp_path / "cc")], tmp_path / "m.json", progress=False, workers=1)
    shard = tmp_path / "cc" / "00002.tar"
    _rename_first_member(shard)  # same size, other member headers
    with pytest.raises(DataError, match=r"00002\.tar changed since it was indexed .*modified"):
        load_shard_set(tmp_path / "m.json")
    with open(shard, "ab") as f:
        f.write(b"\0" * 512)
    with pytest.raises(
        DataError, match=r"00002\.tar changed .*\d+ -> \d+ bytes.*clipfnd data index"
    ):
        load_shard_set(tmp_path / "m.json")


def test_a_copy_with_new_mtimes_keeps_its_manifest(shards, tmp_path, caplog):
    """``cp -r`` to local disk (same bytes, new file mtimes): the sizes and the tar headers
    match the manifest's fingerprints, so the copy is accepted, and says so."""
    shutil.copytree(shards / "cc", tmp_path / "cc", copy_function=shutil.copyfile)
    shutil.copy(shards / "cc.json", tmp_path / "cc.json")
    for p in (tmp_path / "cc").glob("*.tar"):
        st = p.stat()
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    with caplog.at_level(logging.INFO, logger="data_pipelines"):
        copy = load_shard_set(tmp_path / "cc.json")
    assert "4 shard(s) have new mtimes" in caplog.text
    original = load_shard_set(shards / "cc.json")
    for a, b in zip(stream(copy).epoch(0), stream(original).epoch(0)):
        for key in ("index", "label", "text", "image"):
            assert torch.equal(a[key], b[key]), key


def test_sources_brace_patterns_double_colon_and_upsampling(shards, tmp_path):
    write_shards(tmp_path / "b", 2, 48, first_shard=0)
    groups = expand_sources([f"{shards / 'cc'}/{{00000..00001}}.tar::{tmp_path / 'b'}"])
    assert [[p.name for p in g] for g in groups] == [["00000.tar", "00001.tar"]] * 2
    m = index_shards(
        [f"{shards / 'cc'}/{{00000..00001}}.tar::{tmp_path / 'b'}"],
        tmp_path / "m.json",
        upsampling_factors=[1, 3],
        progress=False,
        workers=2,
    )
    assert [s["offset"] for s in m["shards"]] == [0, 36, 72, 108]
    assert [s["weight"] for s in m["shards"]] == [1, 1, 3, 3]
    assert m["shards"][0]["file"] == str(shards / "cc" / "00000.tar")  # outside: absolute
    ss = load_shard_set(tmp_path / "m.json")
    with pytest.raises(DataError, match="upsampling factors.*data.resampled=true"):
        stream(ss)
    s = stream(ss, resampled=True, samples_per_epoch=48)
    assert len(list(s.epoch(0))) == 2
    # the shards a resampled stream draws (raw samples, nothing decoded): about 100 draws
    raw = RankStream(s, 0, 0, LoaderState(0, consumed=[0]))._raw(0, 1, _ErrorLog("raise"))
    urls = [x["__url__"] for x, _ in zip(raw, range(5000))]
    share = sum(str(tmp_path / "b") in u for u in urls) / len(urls)
    assert 0.6 < share < 0.9, share  # the second source is drawn 3 times as often
    with pytest.raises(DataError, match="samples_per_epoch=145 .* 144 samples"):
        stream(ss, resampled=True, samples_per_epoch=145)
    with pytest.raises(DataError, match="2 upsampling factor.*for 1 source"):
        index_shards([str(tmp_path / "b")], tmp_path / "x.json", upsampling_factors=[1, 2])
    with pytest.raises(DataError, match="given twice"):
        index_shards([str(tmp_path / "b"), str(tmp_path / "b" / "00000.tar")], tmp_path / "x.json")
    with pytest.raises(DataError, match="neither a shard nor a folder"):
        expand_sources([str(tmp_path / "nowhere")])


def test_an_unreadable_shard_is_named_or_left_out(shards, tmp_path):
    shutil.copytree(shards / "cc", tmp_path / "cc")
    bad = tmp_path / "cc" / "00003.tar"
    good = bad.read_bytes()
    bad.write_bytes(good[:3000] + b"\x01" * 700)  # a header of garbage
    with pytest.raises(DataError, match=r"cannot read shard .*00003\.tar: .*byte 2560 of 3700"):
        index_shards([str(tmp_path / "cc")], tmp_path / "m.json", progress=False, workers=1)
    bad.write_bytes(good[: len(good) // 2])  # cut short
    with pytest.raises(DataError, match=r"cannot read shard .*00003\.tar.*--skip-unreadable"):
        index_shards([str(tmp_path / "cc")], tmp_path / "m.json", progress=False, workers=1)
    m = index_shards(
        [str(tmp_path / "cc")], tmp_path / "m.json", progress=False, workers=1, skip_unreadable=True
    )
    assert m["num_shards"] == 3 and m["unreadable_shards"][0]["file"].endswith("00003.tar")


def test_string_labels_and_images_only(shards, tmp_path):
    shutil.copytree(shards / "cc", tmp_path / "cc")
    for shard in sorted((tmp_path / "cc").glob("*_stats.json")):
        shard.unlink()
    m = index_shards(
        [str(tmp_path / "cc")],
        tmp_path / "m.json",
        images_only=True,
        label_field="url",
        progress=False,
        workers=1,
    )
    # an empty caption no longer costs a sample; urls are strings, numbered in sorted order
    assert m["num_samples"] == 4 * 40 and m["skipped"] == {
        "failed entry": 16,
        "zero-byte image": 16,
    }
    assert m["label_field"] == {"name": "url", "from_strings": True}
    assert m["label_names"] == sorted(m["label_names"]) and len(m["label_names"]) == 160
    ss = load_shard_set(tmp_path / "m.json")
    batch = next(iter(stream(ss, tokenize=None, global_batch_size=40).epoch(0)))
    assert "text" not in batch and bool((batch["label"] >= 0).all())


def test_the_command_line(shards, tmp_path, capsys):
    from clipfnd.cli.main import main

    assert main(["data", "index", str(shards / "cc"), "--out", str(tmp_path), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert f"{tmp_path / 'manifest.json'}: 144 usable samples in 4 shards" in out
    assert f"data.train={tmp_path / 'manifest.json'}" in out
    assert main(["data", "index", str(tmp_path / "missing"), "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "missing is neither a shard nor a folder" in err[0]


@pytest.mark.slow
def test_train_and_eval_read_an_indexed_manifest(shards, tmp_path, capsys):
    """data.train and data.val take the manifest; clipfnd eval --data and data verify too."""
    from clipfnd.cli.main import main
    from clipfnd.config import load_config
    from clipfnd.train.loop import train

    manifest = shards / "cc.json"
    cfg = load_config(
        None,
        [
            "model.name=clipfnd-tiny-vit",
            f"data.train={manifest}",
            f"data.val={manifest}",
            "data.batch_size=24",
            "data.num_workers=0",
            "fnd.detector=glofnd",
            "fnd.alpha=0.01",  # at least one flag per global batch of 24 (552 negatives)
            "fnd.start_mask=0",
            "train.epochs=1",
            "train.log_every=1",
            "train.progress=false",
            "train.report_to=none",
            "train.plots=false",
            f"output_dir={tmp_path / 'run'}",
        ],
    )
    summary = train(cfg)
    assert summary["steps"] == 6 and summary["skipped_samples"] == 0
    assert summary["eval"]["i2t_R@1"] > 0
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert any("fnd/precision" in r for r in lines)  # labels from the .json field reach GloFND
    args = ["eval", "--checkpoint", str(tmp_path / "run"), "--data", str(manifest)]
    args += ["--task", "knn", "--train-data", str(manifest), "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "eval.json")]) == 0
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["data"]["num_images"] == 144 and result["data"]["unlabelled"] == 0, result
    assert result["metrics"]["top1"] > 0
    assert main(["data", "verify", str(manifest)]) == 0
    assert "ok: the shards agree" in capsys.readouterr().out


def test_a_folder_of_shards_without_a_manifest_says_how_to_index_it(shards, tmp_path):
    from clipfnd.cli.main import main

    shutil.copytree(shards / "cc", tmp_path / "cc")
    with pytest.raises(DataError, match=r"clipfnd data index .*cc --out .*cc"):
        load_shard_set(tmp_path / "cc")
    assert main(["data", "index", str(tmp_path / "cc"), "--out", str(tmp_path / "cc")]) == 0
    assert load_shard_set(tmp_path / "cc").num_samples == 144  # the folder itself now


def test_odd_members_hidden_files_and_old_manifests(shards, tmp_path):
    import webdataset as wds

    root = tmp_path / "odd"
    root.mkdir()
    jpg = (shards / "cc" / "00000.tar").read_bytes()  # any bytes: nothing is decoded here
    with wds.TarWriter(str(root / "00000.tar")) as tar:
        tar.write({"__key__": "a", "jpg": jpg[:100], "txt": b"x", "json": b"null"})
        tar.write({"__key__": "b", "jpg": jpg[:100], "txt": b"x", "json": b'{"tags": [1]}'})
        tar.write({"__key__": "c", "jpg": jpg[:100], "txt": b"x", "json": b'{"tags": "t"}'})
    (root / "._00000.tar").write_bytes(b"AppleDouble")  # not a shard
    m = index_shards([str(root)], tmp_path / "m.json", progress=False, workers=1)
    assert m["num_samples"] == 2 and m["skipped"] == {"unreadable .json": 1}  # null is no dict
    with pytest.raises(DataError, match=r"sample b: .json field 'tags' holds \[1\]; labels must"):
        index_shards([str(root)], tmp_path / "m.json", label_field="tags", progress=False)
    with pytest.raises(DataError, match="upsampling factors must be > 0"):
        index_shards([str(root)], tmp_path / "m.json", upsampling_factors=[float("inf")])
    manifest = json.loads((tmp_path / "m.json").read_text())
    manifest["usable_rule"] = 0
    (tmp_path / "m.json").write_text(json.dumps(manifest))
    with pytest.raises(DataError, match="another version of `clipfnd data index`"):
        load_shard_set(tmp_path / "m.json")
