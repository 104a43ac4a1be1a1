"""Captions whose bytes are not UTF-8: the loader skips and counts the sample (or refuses it
under ``on_error=raise``), ``clipfnd data verify`` lists it, evaluation leaves the caption out;
image-only streams ignore captions."""

from __future__ import annotations

import collections
import io
import logging
import tarfile

import pytest
from PIL import Image

from data_pipelines import DataError, load_shard_set, synthetic
from data_pipelines.index import index_shards
from data_pipelines.shards import iter_tar_samples, write_split
from data_pipelines.verify import verify_split

from test_data import stream

BAD = b"\xff\xfe bad"
KEY = "000000004"  # shard 0, position 4: dataset index 4 either way


def _write_tar(path, samples: list[dict]) -> None:
    with tarfile.open(path, "w") as tf:
        for s in samples:
            for ext, data in s.items():
                if not ext.startswith("__"):
                    info = tarfile.TarInfo(f"{s['__key__']}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))


N = 24


@pytest.fixture
def bad_caption(tmp_path):
    """A split of 24 samples in 2 shards whose sample 4 has a caption that is not UTF-8."""
    dst = tmp_path / "train"
    spec = synthetic.SyntheticSpec(num_concepts=4, seed=1, image_size=16)
    write_split(dst, synthetic.generate(spec, N), shard_size=12, progress=False)
    shard = dst / "shard-000000.tar"
    samples = list(iter_tar_samples(str(shard)))
    assert samples[4]["__key__"] == KEY
    samples[4]["txt"] = BAD
    _write_tar(shard, samples)
    return dst


def _read_epoch(ss, **kw) -> tuple[collections.Counter, set[int]]:
    it = stream(ss, rank=0, world=1, num_workers=0, global_batch_size=1, **kw).epoch(0)
    seen = {i for batch in it for i in batch["index"].tolist()}
    return it.bad, seen


@pytest.mark.parametrize("in_place", [False, True], ids=["built", "indexed"])
def test_the_loader_skips_and_counts_it_or_refuses_it(bad_caption, in_place):
    path = bad_caption
    if in_place:  # the same shards indexed where they are: the sample keeps its index
        path = bad_caption / "in_place.json"
        index_shards([str(bad_caption)], path, progress=False, workers=1)
    ss = load_shard_set(path)
    bad, seen = _read_epoch(ss)
    assert bad == {(str(bad_caption / "shard-000000.tar"), "caption not UTF-8"): 1}
    assert seen == set(range(N)) - {4}
    with pytest.raises(DataError) as e:
        _read_epoch(ss, on_error="raise")
    assert str(e.value) == (
        f"bad sample '{KEY}' in {bad_caption / 'shard-000000.tar'}: "
        "caption not UTF-8 (invalid start byte at byte 0)"
    )
    bad, seen = _read_epoch(ss, tokenize=None)  # image-only: captions are not read
    assert not bad and seen == set(range(N))


@pytest.mark.parametrize("in_place", [False, True], ids=["built", "indexed"])
def test_data_verify_lists_it(bad_caption, in_place, capsys):
    from clipfnd.cli.main import main

    path = bad_caption
    if in_place:
        path = bad_caption / "in_place.json"
        index_shards([str(bad_caption)], path, progress=False, workers=1)
    assert main(["data", "verify", str(path)]) == 1
    out = capsys.readouterr().out
    shard = bad_caption / "shard-000000.tar"
    assert f"problem: {shard} sample {KEY}: caption not UTF-8 (invalid start byte at byte 0)" in out
    assert out.count("problem:") == 1 and "FAILED" in out


def test_data_verify_ignores_captions_of_images_only_data(bad_caption):
    path = bad_caption / "in_place.json"
    index_shards([str(bad_caption)], path, images_only=True, progress=False, workers=1)
    assert verify_split(path, progress=False).ok


def test_evaluation_leaves_the_caption_out_and_names_it(bad_caption, caplog):
    from eval.tar_layouts import ClipfndShards

    with caplog.at_level(logging.WARNING, logger="eval"):
        items = list(ClipfndShards(bad_caption).read_part(0))
    assert len(items) == 12 and items[4].captions == [] and items[4].index == 4
    assert all(it.captions for i, it in enumerate(items) if i != 4)
    shard = bad_caption / "shard-000000.tar"
    assert caplog.messages == [
        f"{shard}: left out 1 caption(s) that are not UTF-8: "
        f"sample {KEY} (invalid start byte at byte 0)"
    ]


def test_clip_benchmark_keeps_the_other_lines_of_a_caption_file(tmp_path, caplog):
    from eval.tar_layouts import ClipBenchmarkWds

    (tmp_path / "test").mkdir()
    (tmp_path / "test" / "nshards.txt").write_text("1\n")
    png = io.BytesIO()
    Image.new("RGB", (4, 4)).save(png, format="PNG")
    _write_tar(
        tmp_path / "test" / "0.tar",
        [
            {"__key__": "a", "png": png.getvalue(), "txt": b"a dog\n" + BAD + b"\na cat\n"},
            {"__key__": "b", "png": png.getvalue(), "txt": "caf\u00e9".encode()},
        ],
    )
    with caplog.at_level(logging.WARNING, logger="eval"):
        items = list(ClipBenchmarkWds(tmp_path, "test").read_part(0))
    assert [it.captions for it in items] == [["a dog", "a cat"], ["caf\u00e9"]]
    assert caplog.messages == [
        f"{tmp_path / 'test' / '0.tar'}: left out 1 caption(s) that are not UTF-8: "
        "sample a (invalid start byte at byte 0)"
    ]
