"""``data_pipelines.splits``: the split of a parquet file from its name, the one rule of
``clipfnd data build --from hf`` and of evaluation."""

from __future__ import annotations

from pathlib import Path

import pytest

from data_pipelines import DataError
from data_pipelines.splits import choose_split, find_parquet, parquet_splits, split_of


def _touch(root: Path, *names: str) -> Path:
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(b"")
    return root


def test_split_names_in_file_and_folder_names(tmp_path):
    root = tmp_path / "ds"
    assert split_of(root / "data" / "train-00000-of-00001.parquet", root) == "train"
    assert split_of(root / "validation.parquet", root) == "validation"
    assert split_of(root / "valid_0.parquet", root) == "valid"
    assert split_of(root / "val" / "0000.parquet", root) == "val"
    assert split_of(root / "default" / "test" / "0000.parquet", root) == "test"
    assert split_of(root / "trainer.parquet", root) is None
    assert split_of(root / "part-0.parquet", root) is None
    # the folder given is the user's choice of name, not a split of the files in it
    assert split_of(tmp_path / "test_set" / "part-0.parquet", tmp_path / "test_set") is None


def test_parquet_files_grouped_chosen_and_refused(tmp_path):
    root = _touch(tmp_path / "test_set", "train.parquet", "test.parquet", "b/valid-1.parquet")
    assert {s: [f.name for f in fs] for s, fs in parquet_splits(root).items()} == {
        "train": ["train.parquet"],
        "test": ["test.parquet"],
        "valid": ["valid-1.parquet"],
    }
    assert [f.name for f in find_parquet(root, None, "test")] == ["test.parquet"]
    assert [f.name for f in find_parquet(root, "train", "test")] == ["train.parquet"]
    with pytest.raises(DataError, match=r"has no split 'val'; its splits are: test, train, valid"):
        find_parquet(root, "val", "test")
    assert find_parquet(_touch(tmp_path / "flat", "a.parquet", "b.parquet"), "x", "test") == [
        tmp_path / "flat" / "a.parquet",
        tmp_path / "flat" / "b.parquet",
    ]
    assert find_parquet(tmp_path / "empty", None, "test") == []
    with pytest.raises(DataError, match=r"several splits \(a, b\); choose one with --split"):
        choose_split(["a", "b"], None, "test", "here")
    _touch(root, "extra.parquet")
    with pytest.raises(DataError, match=r"others none \(e.g. extra.parquet\)"):
        parquet_splits(root)


def test_evaluation_reads_the_split_it_is_asked_for(tmp_path, monkeypatch):
    """Flat train.parquet and test.parquet in a folder whose own name starts like a split."""
    datasets = pytest.importorskip("datasets")
    from PIL import Image

    from eval.layouts import open_dataset

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf_cache")
    root = tmp_path / "test_set"
    root.mkdir()
    for split, n in (("train", 3), ("test", 2)):
        ds = datasets.Dataset.from_dict(
            {"image": [Image.new("RGB", (4, 4))] * n, "caption": [split] * n},
            features=datasets.Features(
                {"image": datasets.Image(), "caption": datasets.Value("string")}
            ),
        )
        ds.to_parquet(str(root / f"{split}.parquet"))
    assert open_dataset(root).num_items == 2  # test, the evaluation default
    assert open_dataset(root, split="train").num_items == 3
    with pytest.raises(DataError, match="has no split 'val'; its splits are: test, train"):
        open_dataset(root, split="val")
