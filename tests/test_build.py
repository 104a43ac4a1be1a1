"""``data_pipelines.build.build_shards``: shards from CSV/TSV, image folders and local HF data."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from data_pipelines.build import build_shards
from data_pipelines.shards import DataError, iter_tar_samples, load_shard_set


def _image(path: Path, color: tuple[int, int, int], fmt: str | None = None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 6), color).save(path, format=fmt)
    return path


def _samples(out: Path) -> list[dict[str, Any]]:
    """All samples of a shard folder in order, with ``.json`` and ``.txt`` decoded."""
    samples = []
    for shard in load_shard_set(out).shards:
        for s in iter_tar_samples(shard.path):
            s["meta"] = json.loads(s["json"])
            s["caption"] = s["txt"].decode("utf-8") if "txt" in s else None
            samples.append(s)
    return samples


def _manifest(out: Path) -> dict[str, Any]:
    return json.loads((out / "manifest.json").read_text())


def _shard_bytes(out: Path) -> list[bytes]:
    return [Path(s.path).read_bytes() for s in load_shard_set(out).shards]


def _check_dense(samples: list[dict[str, Any]]) -> None:
    assert [s["meta"]["index"] for s in samples] == list(range(len(samples)))
    assert [s["__key__"] for s in samples] == [f"{i:09d}" for i in range(len(samples))]


# --- csv ----------------------------------------------------------------------------------------
def test_csv_captions_string_labels_and_dense_indices(tmp_path):
    _image(tmp_path / "img" / "a.png", (255, 0, 0))
    _image(tmp_path / "img" / "b.jpg", (0, 255, 0))
    absolute = _image(tmp_path / "elsewhere" / "c.png", (0, 0, 255))
    (tmp_path / "data.csv").write_text(
        "image,caption,label\n"
        "img/a.png,a red square,red\n"
        'img/b.jpg,"a green square, small",green\n'
        f"{absolute},a blue square,blue\n"
        "img/a.png,another red one,red\n"
    )
    ss = build_shards(
        "csv",
        str(tmp_path / "data.csv"),
        str(tmp_path / "out"),
        shard_size=3,
        label_column="label",
        progress=False,
    )

    assert ss.num_samples == 4 and ss.num_shards == 2
    assert ss.label_names == ["blue", "green", "red"]
    samples = _samples(tmp_path / "out")
    _check_dense(samples)
    assert [s["caption"] for s in samples] == [
        "a red square",
        "a green square, small",
        "a blue square",
        "another red one",
    ]
    assert [s["meta"]["label"] for s in samples] == [2, 1, 0, 2]
    assert "png" in samples[0] and "jpg" in samples[1]
    assert samples[0]["png"] == (tmp_path / "img" / "a.png").read_bytes()
    assert ss.meta == {"source": "csv", "input": str(tmp_path / "data.csv")}
    assert _manifest(tmp_path / "out")["skipped"] == {}


def test_csv_skips_missing_image_and_empty_caption(tmp_path, caplog):
    _image(tmp_path / "a.png", (10, 20, 30))
    (tmp_path / "data.csv").write_text(
        "image,caption\n"
        "a.png,first\n"
        "gone.png,its image file does not exist\n"
        "a.png,   \n"
        "a.png,second\n"
    )
    with caplog.at_level(logging.WARNING, logger="data_pipelines.build"):
        ss = build_shards("csv", str(tmp_path / "data.csv"), str(tmp_path / "out"), progress=False)

    assert ss.num_samples == 2
    samples = _samples(tmp_path / "out")
    _check_dense(samples)
    assert [s["caption"] for s in samples] == ["first", "second"]
    assert "label" not in samples[0]["meta"] and ss.label_names is None
    assert _manifest(tmp_path / "out")["skipped"] == {"empty caption": 1, "missing image file": 1}
    assert str(tmp_path / "gone.png") in caplog.text


def test_csv_without_caption_column_names_it(tmp_path):
    _image(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "data.csv").write_text("image,text\na.png,hello\n")
    with pytest.raises(DataError, match=r"caption column 'caption'.*'image', 'text'"):
        build_shards("csv", str(tmp_path / "data.csv"), str(tmp_path / "out"), progress=False)
    # the configured name is what is looked for
    ss = build_shards(
        "csv",
        str(tmp_path / "data.csv"),
        str(tmp_path / "out"),
        caption_column="text",
        progress=False,
    )
    assert ss.num_samples == 1


def test_tsv_with_integer_labels(tmp_path):
    _image(tmp_path / "a.png", (1, 2, 3))
    _image(tmp_path / "b.png", (4, 5, 6))
    (tmp_path / "data.tsv").write_text(
        "path\ttext\tcls\na.png\tcommas, stay, in the caption\t2\nb.png\tplain\t0\n"
    )
    ss = build_shards(
        "csv",
        str(tmp_path / "data.tsv"),
        str(tmp_path / "out"),
        image_column="path",
        caption_column="text",
        label_column="cls",
        progress=False,
    )
    samples = _samples(tmp_path / "out")
    assert [s["caption"] for s in samples] == ["commas, stay, in the caption", "plain"]
    assert [s["meta"]["label"] for s in samples] == [2, 0]
    assert ss.label_names == ["0", "1", "2"]


def test_csv_several_captions_per_image_share_image_id(tmp_path):
    _image(tmp_path / "x" / "a.png", (1, 2, 3))
    _image(tmp_path / "x" / "b.png", (4, 5, 6))
    (tmp_path / "caps.csv").write_text(
        "image;caption\nx/a.png;one\nx/b.png;two\nx/a.png;three\nx/a.png;four\n"
    )
    build_shards(
        "csv", str(tmp_path / "caps.csv"), str(tmp_path / "out"), separator=";", progress=False
    )
    samples = _samples(tmp_path / "out")
    assert [s["meta"]["image_id"] for s in samples] == ["x/a.png", "x/b.png", "x/a.png", "x/a.png"]
    assert samples[0]["png"] == samples[2]["png"]


def test_csv_build_is_deterministic(tmp_path):
    for i in range(5):
        _image(tmp_path / f"{i}.png", (i * 40, 0, 255 - i * 40))
    rows = "".join(f"{i}.png,caption {i},{i % 2}\n" for i in range(5))
    (tmp_path / "d.csv").write_text("image,caption,label\n" + rows)
    for out in ("one", "two"):
        build_shards(
            "csv",
            str(tmp_path / "d.csv"),
            str(tmp_path / out),
            shard_size=2,
            label_column="label",
            progress=False,
        )
    assert _shard_bytes(tmp_path / "one") == _shard_bytes(tmp_path / "two")
    assert _manifest(tmp_path / "one") == _manifest(tmp_path / "two")


# --- image folder -------------------------------------------------------------------------------
def test_imagefolder_sidecar_captions_and_folder_labels(tmp_path):
    root = tmp_path / "pics"
    _image(root / "dogs" / "d2.png", (1, 1, 1))
    _image(root / "dogs" / "d1.jpg", (2, 2, 2))
    _image(root / "cats" / "deep" / "c1.png", (3, 3, 3))
    _image(root / "cats" / "c0.webp", (4, 4, 4), fmt="WEBP")
    _image(root / "cats" / "no_caption.png", (5, 5, 5))
    _image(root / ".hidden" / "h.png", (6, 6, 6))
    for rel, text in [
        ("dogs/d2", "dog two"),
        ("dogs/d1", "dog one\n"),
        ("cats/deep/c1", "cat one"),
        ("cats/c0", "cat zero"),
        (".hidden/h", "x"),
    ]:
        (root / f"{rel}.txt").write_text(text)
    (root / "notes.md").write_text("not an image")

    ss = build_shards(
        "imagefolder", str(root), str(tmp_path / "out"), label_column="folder", progress=False
    )

    samples = _samples(tmp_path / "out")
    _check_dense(samples)
    assert [s["caption"] for s in samples] == ["cat zero", "cat one", "dog one", "dog two"]
    assert ss.label_names == ["cats", "deep", "dogs"]
    assert [s["meta"]["label"] for s in samples] == [0, 1, 2, 2]
    assert "webp" in samples[0] and "jpg" in samples[2]
    assert _manifest(tmp_path / "out")["skipped"] == {"empty caption": 1}

    unlabelled = build_shards("imagefolder", str(root), str(tmp_path / "out2"), progress=False)
    assert unlabelled.label_names is None
    assert all("label" not in s["meta"] for s in _samples(tmp_path / "out2"))


# --- Hugging Face -------------------------------------------------------------------------------
@pytest.fixture
def hf_dataset(tmp_path, monkeypatch):
    """A tiny Dataset with an Image() column (PIL images and one JPEG file by path)."""
    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    jpg = _image(tmp_path / "files" / "photo.jpg", (9, 99, 199))
    images = [Image.new("RGB", (8, 8), (i * 60, 10, 20)) for i in range(3)] + [str(jpg)]
    features = datasets.Features(
        {
            "image": datasets.Image(),
            "caption": datasets.Value("string"),
            "label": datasets.Value("string"),
            "extra": datasets.Value("int64"),
        }
    )
    return datasets.Dataset.from_dict(
        {
            "image": images,
            "caption": ["zero", "one", "", "photo"],
            "label": ["plane", "car", "car", "bird"],
            "extra": [0, 1, 2, 3],
        },
        features=features,
    )


def test_hf_save_to_disk_image_feature_and_string_labels(tmp_path, hf_dataset):
    import datasets

    hf_dataset.save_to_disk(str(tmp_path / "ds"))
    ss = build_shards(
        "hf", str(tmp_path / "ds"), str(tmp_path / "out"), label_column="label", progress=False
    )

    samples = _samples(tmp_path / "out")
    _check_dense(samples)
    assert [s["caption"] for s in samples] == ["zero", "one", "photo"]
    assert ss.label_names == ["bird", "car", "plane"]
    assert [s["meta"]["label"] for s in samples] == [2, 1, 0]
    assert "png" in samples[0]
    assert samples[2]["jpg"] == (tmp_path / "files" / "photo.jpg").read_bytes()  # kept as is
    assert _manifest(tmp_path / "out")["skipped"] == {"empty caption": 1}

    # a DatasetDict: the split is chosen with hf_split
    datasets.DatasetDict({"train": hf_dataset.select([0]), "val": hf_dataset}).save_to_disk(
        str(tmp_path / "dd")
    )
    val = build_shards(
        "hf", str(tmp_path / "dd"), str(tmp_path / "out_val"), hf_split="val", progress=False
    )
    assert val.num_samples == 3
    with pytest.raises(DataError, match=r"no split 'test'.*train, val"):
        build_shards(
            "hf", str(tmp_path / "dd"), str(tmp_path / "o"), hf_split="test", progress=False
        )

    # same input, same bytes
    build_shards(
        "hf", str(tmp_path / "ds"), str(tmp_path / "again"), label_column="label", progress=False
    )
    assert _shard_bytes(tmp_path / "out") == _shard_bytes(tmp_path / "again")


def test_hf_parquet_file_and_folder(tmp_path, hf_dataset):
    (tmp_path / "pq").mkdir()
    hf_dataset.select([0, 1]).to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    hf_dataset.select([2, 3]).to_parquet(str(tmp_path / "pq" / "part-1.parquet"))

    one = build_shards(
        "hf",
        str(tmp_path / "pq" / "part-0.parquet"),
        str(tmp_path / "o1"),
        label_column="label",
        progress=False,
    )
    assert [s["caption"] for s in _samples(tmp_path / "o1")] == ["zero", "one"]
    assert one.label_names == ["car", "plane"]

    both = build_shards(
        "hf", str(tmp_path / "pq"), str(tmp_path / "o2"), label_column="label", progress=False
    )
    samples = _samples(tmp_path / "o2")
    _check_dense(samples)
    assert [s["caption"] for s in samples] == ["zero", "one", "photo"]
    assert both.label_names == ["bird", "car", "plane"]
    assert [s["meta"]["label"] for s in samples] == [2, 1, 0]
    assert samples[2]["jpg"] == (tmp_path / "files" / "photo.jpg").read_bytes()


def test_hf_without_column_names_it(tmp_path, hf_dataset):
    hf_dataset.save_to_disk(str(tmp_path / "ds"))
    with pytest.raises(DataError, match=r"label column 'cls'.*'caption'"):
        build_shards(
            "hf", str(tmp_path / "ds"), str(tmp_path / "out"), label_column="cls", progress=False
        )


def test_hf_caption_lists_bytes_column_and_int_labels(tmp_path, monkeypatch):
    import io

    datasets = pytest.importorskip("datasets")
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    blobs = []
    for color in [(1, 2, 3), (4, 5, 6)]:
        buf = io.BytesIO()
        Image.new("RGB", (4, 4), color).save(buf, format="GIF")  # not kept: becomes PNG
        blobs.append(buf.getvalue())
    ds = datasets.Dataset.from_dict({"img": blobs, "sentences": [["a", "b"], ["c"]], "y": [3, 1]})
    ds.save_to_disk(str(tmp_path / "ds"))
    ss = build_shards(
        "hf",
        str(tmp_path / "ds"),
        str(tmp_path / "out"),
        image_column="img",
        caption_column="sentences",
        label_column="y",
        progress=False,
    )
    samples = _samples(tmp_path / "out")
    _check_dense(samples)
    assert [s["caption"] for s in samples] == ["a", "b", "c"]
    assert [s["meta"]["image_id"] for s in samples] == ["row 0", "row 0", "row 1"]
    assert [s["meta"]["label"] for s in samples] == [3, 3, 1]
    assert ss.label_names == ["0", "1", "2", "3"]
    assert all("png" in s for s in samples)


# --- errors -------------------------------------------------------------------------------------
def test_unknown_source_and_missing_input(tmp_path):
    with pytest.raises(ValueError, match=r"'parquet'.*csv, imagefolder, hf"):
        build_shards("parquet", str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(DataError, match="nope.csv does not exist"):
        build_shards("csv", str(tmp_path / "nope.csv"), str(tmp_path / "out"))
    with pytest.raises(DataError, match="no images"):
        build_shards("imagefolder", str(tmp_path), str(tmp_path / "out"))


def test_cli_data_build(tmp_path, capsys):
    from clipfnd.cli.main import main

    _image(tmp_path / "a.png", (1, 2, 3))
    (tmp_path / "d.csv").write_text("image,caption\na.png,hello\n")
    assert (
        main(
            [
                "data",
                "build",
                "--from",
                "csv",
                "--input",
                str(tmp_path / "d.csv"),
                "--out",
                str(tmp_path / "out"),
            ]
        )
        == 0
    )
    assert json.loads(capsys.readouterr().out)["samples"] == 1
    assert (
        main(
            [
                "data",
                "build",
                "--from",
                "csv",
                "--input",
                str(tmp_path / "d.csv"),
                "--out",
                str(tmp_path / "o2"),
                "--caption-column",
                "text",
            ]
        )
        == 2
    )
    assert "'text'" in capsys.readouterr().err


def test_images_only_builds_keep_every_image_and_write_no_caption(tmp_path, hf_dataset):
    """Vision-only data: no caption column is needed or read (an empty caption is no reason
    to skip), labels still come through."""
    hf_dataset.remove_columns("caption").save_to_disk(str(tmp_path / "ds"))
    ss = build_shards(
        "hf",
        str(tmp_path / "ds"),
        str(tmp_path / "out"),
        label_column="label",
        images_only=True,
        progress=False,
    )
    samples = _samples(tmp_path / "out")
    _check_dense(samples)
    assert ss.num_samples == 4 and [s["caption"] for s in samples] == [None] * 4
    assert [s["meta"]["label"] for s in samples] == [2, 1, 1, 0]
    assert _manifest(tmp_path / "out")["meta"]["images_only"] is True
    with pytest.raises(DataError, match="caption"):  # without the switch the column is required
        build_shards("hf", str(tmp_path / "ds"), str(tmp_path / "out2"), progress=False)


def test_captions_that_are_not_utf8_are_skipped_and_named_the_same_way_everywhere(tmp_path, caplog):
    """CSV: the row is skipped and its line named (the file used to fail whole); image
    folder: the sidecar's image is skipped and named (its bytes used to become U+FFFD)."""
    _image(tmp_path / "a.png", (10, 20, 30))
    (tmp_path / "data.csv").write_bytes(
        b"image,caption\na.png,first\na.png,caf\xe9 latin-1\na.png,third\n"
    )
    with caplog.at_level(logging.WARNING):
        ss = build_shards("csv", str(tmp_path / "data.csv"), str(tmp_path / "out"), progress=False)
    assert ss.num_samples == 2
    assert [s["caption"] for s in _samples(tmp_path / "out")] == ["first", "third"]
    assert _manifest(tmp_path / "out")["skipped"] == {"caption not UTF-8": 1}
    assert "data.csv:3" in caplog.text

    root = tmp_path / "folder"
    _image(root / "x.png", (1, 2, 3))
    (root / "x.txt").write_text("fine")
    _image(root / "y.png", (4, 5, 6))
    (root / "y.txt").write_bytes(b"\xff\xfe broken")
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        ss = build_shards("imagefolder", str(root), str(tmp_path / "out2"), progress=False)
    assert ss.num_samples == 1 and _samples(tmp_path / "out2")[0]["caption"] == "fine"
    assert _manifest(tmp_path / "out2")["skipped"] == {"caption not UTF-8": 1}
    assert "y.txt" in caplog.text


# --- splits of a folder of parquet files --------------------------------------------------------
def _split_folder(root: Path, hf_dataset, layout: str) -> Path:
    """train (rows 0, 1) and test (row 3) as the Hub names them, or flat; the flat folder's own
    name is a split name, which says nothing about the files in it."""
    pattern = {"hub": "data/{}-00000-of-00001.parquet", "flat": "{}.parquet"}[layout]
    for split, rows in (("train", [0, 1]), ("test", [3])):
        file = root / pattern.format(split)
        file.parent.mkdir(parents=True, exist_ok=True)
        hf_dataset.select(rows).to_parquet(str(file))
    return root


@pytest.mark.parametrize("layout", ["hub", "flat"])
def test_hf_split_takes_only_that_splits_parquet_files(tmp_path, hf_dataset, layout):
    root = _split_folder(tmp_path / "test_set", hf_dataset, layout)
    build_shards("hf", str(root), str(tmp_path / "test"), hf_split="test", progress=False)
    assert [s["caption"] for s in _samples(tmp_path / "test")] == ["photo"]
    build_shards("hf", str(root), str(tmp_path / "train"), progress=False)  # the default: train
    assert [s["caption"] for s in _samples(tmp_path / "train")] == ["zero", "one"]
    with pytest.raises(DataError) as e:
        build_shards("hf", str(root), str(tmp_path / "v"), hf_split="validation", progress=False)
    assert str(e.value) == (
        f"{root} has no split 'validation'; its splits are: test, train "
        "(choose one with --hf-split)"
    )


def test_hf_split_on_the_command_line(tmp_path, hf_dataset, capsys):
    from clipfnd.cli.main import main

    root = _split_folder(tmp_path / "hub", hf_dataset, "hub")
    args = ["data", "build", "--from", "hf", "--input", str(root), "--hf-split"]
    assert main([*args, "test", "--out", str(tmp_path / "out")]) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 1
    assert main([*args, "val", "--out", str(tmp_path / "o2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "has no split 'val'; its splits are: test, train" in err[0], err
    assert not (tmp_path / "o2" / "manifest.json").exists()


def test_parquet_without_split_names_is_read_whole_and_another_split_is_named(
    tmp_path, hf_dataset, caplog
):
    (tmp_path / "pq").mkdir()
    hf_dataset.select([0, 1]).to_parquet(str(tmp_path / "pq" / "part-0.parquet"))
    hf_dataset.select([3]).to_parquet(str(tmp_path / "pq" / "part-1.parquet"))
    with caplog.at_level(logging.WARNING):
        build_shards("hf", str(tmp_path / "pq"), str(tmp_path / "o1"), progress=False)
    assert caplog.text == ""  # the default split: nothing to say
    with caplog.at_level(logging.WARNING):
        ss = build_shards(
            "hf", str(tmp_path / "pq"), str(tmp_path / "o2"), hf_split="test", progress=False
        )
    assert ss.num_samples == 3
    assert "the names of its 2 .parquet file(s) carry no split; read whole (--hf-split test" in (
        caplog.text
    )

    hf_dataset.select([2]).to_parquet(str(tmp_path / "pq" / "test.parquet"))  # some named
    with pytest.raises(DataError, match=r"split name \(test\) and others none \(e.g. part-0"):
        build_shards("hf", str(tmp_path / "pq"), str(tmp_path / "o3"), progress=False)
