"""One rule for labels read from user tables (``data_pipelines.labels``), shared by
``clipfnd data build`` and ``clipfnd eval``: the same table gives the same ids and names."""

from __future__ import annotations

import csv
import json

import pytest
from PIL import Image

from clipfnd_eval.layouts import open_dataset
from data_pipelines import DataError, load_shard_set
from data_pipelines.build import build_shards
from data_pipelines.labels import label_map
from data_pipelines.shards import iter_tar_samples


def test_label_rule():
    m = label_map([3, 1, 3], "t")
    assert m.to_int == {1: 1, 3: 3} and m.names == ["0", "1", "2", "3"] and not m.from_strings
    m = label_map(["2", " +0 ", "2"], "t")  # integer text is an integer
    assert m.to_int == {"2": 2, " +0 ": 0} and not m.from_strings
    m = label_map(["dog", "cat", "dog"], "t")
    assert m.to_int == {"cat": 0, "dog": 1} and m.names == ["cat", "dog"] and m.from_strings
    with pytest.raises(DataError, match="t: labels must be integers or strings, found float, int"):
        label_map([1, 2.5], "t")
    with pytest.raises(DataError, match="t: integer labels must be >= 0, found -2"):
        label_map([-2, 1], "t")
    with pytest.raises(DataError, match="must be integers or strings, found bool"):
        label_map([True, False], "t")


def _table(tmp_path, labels: list[str]):
    rows = []
    for i, lab in enumerate(labels):
        Image.new("RGB", (8, 8), (i * 40 % 256, 0, 0)).save(tmp_path / f"{i}.jpg")
        rows.append({"image": f"{i}.jpg", "caption": f"picture {i}", "label": lab})
    path = tmp_path / "table.csv"
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "caption", "label"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_build_and_eval_read_one_csv_the_same_way(tmp_path):
    path = _table(tmp_path, ["plane", "bird", "car", "bird"])
    ss = build_shards(
        "csv",
        str(path),
        str(tmp_path / "shards"),
        image_column="image",
        caption_column="caption",
        label_column="label",
    )
    built = sorted(
        (json.loads(s["json"])["index"], json.loads(s["json"])["label"])
        for sh in load_shard_set(tmp_path / "shards").shards
        for s in iter_tar_samples(sh.path)
    )
    ds = open_dataset(path, label_column="label")
    read = [item.label for part in range(ds.num_parts()) for item in ds.read_part(part)]
    assert [label for _, label in built] == read == [2, 0, 1, 0]
    assert ss.label_names == ds.classnames == ["bird", "car", "plane"]


def test_eval_numbers_string_labels_of_a_hugging_face_dataset(tmp_path):
    """A string label column (not a ClassLabel) used to be read as 'no label' for every row."""
    import datasets

    ds = datasets.Dataset.from_dict(
        {
            "image": [Image.new("RGB", (8, 8)) for _ in range(4)],
            "caption": ["a", "b", "c", "d"],
            "label": ["dog", "cat", None, "dog"],
        },
        features=datasets.Features(
            {
                "image": datasets.Image(),
                "caption": datasets.Value("string"),
                "label": datasets.Value("string"),
            }
        ),
    )
    ds.save_to_disk(str(tmp_path / "hf"))
    opened = open_dataset(tmp_path / "hf", label_column="label")
    labels = [item.label for part in range(opened.num_parts()) for item in opened.read_part(part)]
    assert labels == [1, 0, -1, 1]  # the missing one is unlabelled
    assert opened.classnames == ["cat", "dog"]
