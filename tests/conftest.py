"""Shared fixtures: small shard folders the tests write themselves (nothing is downloaded)."""

from __future__ import annotations

import os

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def shapes(tmp_path_factory):
    """Captioned shapes: train 512 samples in 8 shards of 64, val 128; 16 concepts."""
    from data_pipelines import synthetic
    from data_pipelines.shards import write_split

    root = tmp_path_factory.mktemp("shapes")
    spec = synthetic.SyntheticSpec(num_concepts=16, seed=3, image_size=32)
    names = synthetic.label_names(spec)
    write_split(
        root / "train",
        synthetic.generate(spec, 512, "train"),
        shard_size=64,
        label_names=names,
        progress=False,
    )
    write_split(
        root / "val",
        synthetic.generate(spec, 128, "val"),
        shard_size=64,
        label_names=names,
        progress=False,
    )
    return root


@pytest.fixture(scope="session")
def digits(tmp_path_factory):
    """scikit-learn's digits at 32 px: train 1438 images in 8 shards of 180, val 359; labelled."""
    from data_pipelines import digits as digits_data

    root = tmp_path_factory.mktemp("digits")
    digits_data.write_splits(root, seed=0, shard_size=180, progress=False)
    return root
