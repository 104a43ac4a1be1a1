"""Per-sample tables: a checkpoint's ``tables.safetensors`` restores every table bit for bit."""

from __future__ import annotations

import torch

from clipfnd.config import FNDConfig
from clipfnd.fnd import GloFND
from clipfnd.state import StateTables
from clipfnd.state.files import load_tables, save_tables


def test_tables_survive_save_and_load(tmp_path):
    tables = StateTables(1000)
    GloFND.from_config(FNDConfig(), tables, ("img", "txt"))
    tables.add("gcl.u_img", 0.0)
    g = torch.Generator().manual_seed(0)
    for name in tables.names():
        tables[name].copy_(torch.randn(1000, generator=g, dtype=torch.float64).float())
    saved = {n: tables[n].clone() for n in tables.names()}
    save_tables(tables, tmp_path / "tables.safetensors")
    for name in tables.names():
        tables[name].zero_()
    load_tables(tables, tmp_path)  # the checkpoint folder
    for name, value in saved.items():
        assert torch.equal(tables[name], value), name


def test_write_rows_single_process_sets_only_those_rows():
    tables = StateTables(10)
    tables.add("a", 1.0)
    tables.add("b", 0.0)
    tables.write_rows(
        torch.tensor([2, 7]), {"a": torch.tensor([5.0, 6.0]), "b": torch.tensor([-1.0, -2.0])}
    )
    assert tables["a"].tolist() == [1, 1, 5, 1, 1, 1, 1, 6, 1, 1]
    assert tables["b"].tolist() == [0, 0, -1, 0, 0, 0, 0, -2, 0, 0]


def test_load_refuses_another_dataset_size():
    import pytest

    a, b = StateTables(10), StateTables(11)
    a.add("x")
    b.add("x")
    with pytest.raises(ValueError, match="10 rows, this run's dataset has 11"):
        b.load_state_dict(a.state_dict())
