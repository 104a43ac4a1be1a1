"""``fnd.state: sharded``: per-sample tables split over the ranks equal the replicated ones
bit for bit, on 2 and 3 processes (real gloo groups), with a resume on another world size;
each rank holds N / world rows."""

from __future__ import annotations

import pytest
import torch
from test_distributed import CONFIGS, N, run_steps

from clipfnd.config import ConfigError, load_config
from clipfnd.state import ShardedTables, StateTables
from clipfnd.state.files import read_full_tables
from clipfnd.testing.gloo import run_group

pytestmark = pytest.mark.distributed

NAMES = ["clip_glofnd", "fastclip_v3_glofnd", "fastclip_v3_glofnd_repeats"]


def _both(rank, world, steps):
    out = {}
    for name in NAMES:
        for state in ("replicated", "sharded"):
            over = {**CONFIGS[name], "fnd.state": state}
            out[name, state] = run_steps(rank, world, over, steps)
    return out


def _assemble(results, name):
    """The sharded tables of every rank put back together (rank r holds rows r::world)."""
    world = len(results)
    parts = [r[name, "sharded"][1] for r in results]
    full = {}
    for key in parts[0]:
        t = torch.empty(N, dtype=parts[0][key].dtype)
        for r in range(world):
            assert parts[r][key].numel() == len(range(r, N, world))  # N / world rows each
            t[r::world] = parts[r][key]
        full[key] = t
    return full


@pytest.mark.parametrize("world", [2, 3])
def test_sharded_equals_replicated_bit_for_bit(world):
    results = run_group(_both, world, 6)
    for name in NAMES:
        rep_losses, rep_tables, rep_params, rep_state = results[0][name, "replicated"]
        assert (rep_tables["glofnd.lambda_img"] < 1.0).any(), name  # thresholds moved
        for r in results:
            losses, _, params, state = r[name, "sharded"]
            assert losses == rep_losses, name  # exactly
            assert state == rep_state, name
            for p, q in zip(params, rep_params):
                assert torch.equal(p, q), name
        full = _assemble(results, name)
        assert set(full) == set(rep_tables)
        for key, t in full.items():
            assert torch.equal(t, rep_tables[key]), (name, key)


def _resume(rank, world, name, state, params, tables_dir, detector_state):
    over = {**CONFIGS[name], "fnd.state": state}
    return run_steps(
        rank,
        world,
        over,
        4,
        first=4,
        params_from=params,
        tables_dir=tables_dir,
        detector_state=detector_state,
    )


def _first_half(rank, world, name, save_dir):
    over = {**CONFIGS[name], "fnd.state": "sharded"}
    return run_steps(rank, world, over, 4, save_dir=save_dir)


@pytest.mark.parametrize("name", ["fastclip_v3_glofnd"])
def test_a_sharded_checkpoint_resumes_on_other_world_sizes(name, tmp_path):
    """4 steps sharded on 2 processes, saved per rank as checkpoints do (tables, and the
    detector's run-wide state); then 4 more steps.
    Replicated on 1 process (the shards reassembled) and sharded on 2 (each rank its own
    file) equal 8 steps on one process. On 3 processes (re-sharded rows), sharded equals
    replicated from the same checkpoint."""
    ref_losses, ref_tables, *_ = run_steps(0, 1, {**CONFIGS[name], "fnd.state": "replicated"})
    saved = tmp_path / "ckpt"
    saved.mkdir()
    first = run_group(_first_half, 2, name, str(saved))
    assert sorted(p.name for p in saved.iterdir()) == [
        "tables_rank0_of_2.safetensors",
        "tables_rank1_of_2.safetensors",
    ]
    params, detector_state = first[0][2], first[0][3]
    assert read_full_tables(saved)[0] == N
    for world, state in ((1, "replicated"), (2, "sharded")):
        if world == 1:
            runs = [_resume(0, 1, name, state, params, str(saved), detector_state)]
        else:
            runs = run_group(_resume, world, name, state, params, str(saved), detector_state)
        losses = first[0][0] + runs[0][0]
        assert losses == pytest.approx(ref_losses, abs=1e-6, rel=0), (world, state)
        if state == "replicated":
            tables = runs[0][1]
        else:
            tables = _assemble([{(name, "sharded"): r} for r in runs], name)
        for key in ref_tables:
            rtol = 1e-6 if key.startswith("gcl.u_") else 0.0
            torch.testing.assert_close(tables[key], ref_tables[key], atol=1e-6, rtol=rtol)
    three = run_group(_resume_both, 3, name, params, str(saved), detector_state)
    assert three[0]["sharded"][0] == three[0]["replicated"][0]
    full = _assemble([{(name, "sharded"): r["sharded"]} for r in three], name)
    for key, t in full.items():
        assert torch.equal(t, three[0]["replicated"][1][key]), key


def _resume_both(rank, world, name, params, tables_dir, detector_state):
    return {
        s: _resume(rank, world, name, s, params, tables_dir, detector_state)
        for s in ("replicated", "sharded")
    }


def test_sharded_tables_hold_their_rows_only_and_refuse_whole_table_access():
    t = ShardedTables(10, rank=1, world=3)
    assert t.add("x", 2.0).shape == (3,)  # rows 1, 4, 7
    assert ShardedTables(10, rank=0, world=3).add("x").shape == (4,)  # rows 0, 3, 6, 9
    with pytest.raises(Exception, match="sharded over the processes"):
        t["x"]
    one = ShardedTables(5, rank=0, world=1)  # one process: every row, same answers
    one.add("x", 0.0)
    one.write_rows(torch.tensor([3, 1]), {"x": torch.tensor([7.0, 5.0])})
    rep = StateTables(5)
    rep.add("x", 0.0)
    rep.write_rows(torch.tensor([3, 1]), {"x": torch.tensor([7.0, 5.0])})
    assert torch.equal(
        one.rows("x", torch.tensor([1, 3, 0])), rep.rows("x", torch.tensor([1, 3, 0]))
    )


def test_ifnd_with_sharded_state_is_refused():
    with pytest.raises(ConfigError, match="fnd.state=sharded does not work with fnd.detector=ifnd"):
        load_config(None, ["data.train=x", "mode=simclr", "fnd.detector=ifnd", "fnd.state=sharded"])


def test_tables_load_piece_by_piece_into_any_layout_and_mixed_layouts_are_refused(
    tmp_path, monkeypatch
):
    from clipfnd.state import files as checkpoint

    full = StateTables(10)
    full.add("x")
    full["x"].copy_(torch.arange(10.0))
    checkpoint.save_tables(full, tmp_path / checkpoint.TABLES_FILE)
    monkeypatch.setattr(checkpoint, "ROWS_PER_READ", 3)  # several pieces per table
    part = ShardedTables(10, rank=1, world=3)
    part.add("x")
    checkpoint.load_tables(part, tmp_path)
    assert part.local("x").tolist() == [1.0, 4.0, 7.0]
    checkpoint.save_tables(part, tmp_path / checkpoint.shard_file(1, 3))
    with pytest.raises(Exception, match="holds both tables.safetensors and per-rank table files"):
        checkpoint.load_tables(part, tmp_path)
