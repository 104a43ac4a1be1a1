"""Per-sample tables and a detector's run-wide state in a checkpoint folder: the one place
that reads and writes them (training's save and resume, the report, tests).

- ``tables.safetensors`` (``TABLES_FILE``): replicated tables, one copy; under
  ``fnd.state=sharded`` each rank writes its own rows instead (``shard_file``). Row count, and
  shard when sharded, are in the safetensors metadata; nothing is pickled.
- ``detector.json`` (``DETECTOR_FILE``): the detector's ``state_dict``.
- ``detector.safetensors`` (``DETECTOR_TENSORS``): the tensors of its run-wide state, where
  it has any (GloFND's queue of recent columns), one copy.

A checkpoint's other files and its layout are ``clipfnd.checkpoints`` (reading) and the
training recipe (writing); of them this module reads only ``trainer_state.json``'s step, for a
checkpoint written before ``detector.json`` existed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import safetensors
import safetensors.torch
import torch

from ..errors import CheckpointError
from .tables import ShardedTables, StateTables

TABLES_FILE = "tables.safetensors"
DETECTOR_FILE = "detector.json"
DETECTOR_TENSORS = "detector.safetensors"

# rows read from a checkpoint's tables at a time when they are put into another layout
ROWS_PER_READ = 1 << 22


def shard_file(rank: int, world: int) -> str:
    """The file of rank ``rank``'s tables under ``fnd.state=sharded``."""
    return f"tables_rank{rank}_of_{world}.safetensors"


def save_tables(tables, path: Path) -> None:
    """The per-sample tables as safetensors (row count, and shard when sharded, in the
    metadata): ``tables.safetensors``, or this rank's ``shard_file``."""
    state = tables.state_dict()
    meta = {"num_rows": str(state["num_rows"])}
    if "world" in state:
        meta |= {"rank": str(state["rank"]), "world": str(state["world"])}
    safetensors.torch.save_file(
        {n: t.contiguous() for n, t in state["tables"].items()} or {"_none": torch.zeros(0)},
        str(path),
        metadata=meta,
    )


def _read(path: Path) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
        loaded = {k: f.get_tensor(k) for k in f.keys() if k != "_none"}
    return meta, loaded


def _int(meta: dict[str, str], key: str, path: Path) -> int:
    try:
        return int(meta[key])
    except (KeyError, ValueError) as e:
        raise CheckpointError(f"{path} does not say its tables' {key}") from e


def table_sources(ckpt: Path) -> tuple[int, list[tuple[Path, int, int]]]:
    """The table files of checkpoint ``ckpt``: the row count and ``(file, first row, stride)``
    for each (``tables.safetensors``: ``(0, 1)``; rank ``r`` of ``W``: ``(r, W)``). Only the
    metadata is read. A folder with both layouts, or shards that are not one set, is refused."""
    full = ckpt / TABLES_FILE
    shards = sorted(ckpt.glob("tables_rank*_of_*.safetensors"))
    if full.is_file() and shards:
        raise CheckpointError(
            f"{ckpt} holds both {TABLES_FILE} and per-rank table files; it was changed after "
            "clipfnd wrote it"
        )
    if full.is_file():
        with safetensors.safe_open(str(full), framework="pt") as f:
            return _int(f.metadata() or {}, "num_rows", full), [(full, 0, 1)]
    if not shards:
        raise CheckpointError(f"{ckpt} has no {TABLES_FILE} and no per-rank table shards")
    found, worlds, rows = {}, set(), set()
    for p in shards:
        with safetensors.safe_open(str(p), framework="pt") as f:
            meta = f.metadata() or {}
        found[_int(meta, "rank", p)] = p
        worlds.add(_int(meta, "world", p))
        rows.add(_int(meta, "num_rows", p))
    world = next(iter(worlds)) if len(worlds) == 1 else None
    if world is None or len(rows) != 1 or sorted(found) != list(range(world)):
        raise CheckpointError(
            f"{ckpt}: its table shards do not make one set (ranks {sorted(found)}, world "
            f"sizes {sorted(worlds)})"
        )
    return rows.pop(), [(found[r], r, world) for r in range(world)]


def load_tables(tables, ckpt: Path) -> None:
    """The per-sample tables of checkpoint ``ckpt`` (no pickle), in this run's layout. A
    sharded run on the world size that wrote its shards reads only its own file; any other
    combination reads every file piece by piece (``ROWS_PER_READ`` rows at a time) and keeps
    the rows this process holds, so it never holds more than its tables and one piece."""
    sharded = isinstance(tables, ShardedTables)
    own = ckpt / shard_file(tables.rank, tables.world) if sharded else None
    if own is not None and own.is_file() and not (ckpt / TABLES_FILE).is_file():
        meta, loaded = _read(own)
        tables.load_state_dict(
            {
                "num_rows": _int(meta, "num_rows", own),
                "rank": _int(meta, "rank", own),
                "world": _int(meta, "world", own),
                "tables": loaded,
            }
        )
        return
    num_rows, sources = table_sources(ckpt)
    if num_rows != tables.num_rows:
        raise CheckpointError(
            f"checkpoint tables have {num_rows} rows, this run's dataset has "
            f"{tables.num_rows}: resume with the same training data"
        )
    for path, first, stride in sources:
        with safetensors.safe_open(str(path), framework="pt") as f:
            missing = sorted(set(tables.names()) - set(f.keys()))
            if missing:
                raise CheckpointError(f"checkpoint lacks per-sample tables {missing} ({path})")
            for name in tables.names():
                piece = f.get_slice(name)
                n = piece.get_shape()[0]
                if n != len(range(first, num_rows, stride)):
                    raise CheckpointError(f"{path}: table {name} has {n} rows, not its share")
                for a in range(0, n, ROWS_PER_READ):
                    values = piece[a : a + ROWS_PER_READ]
                    rows = first + stride * torch.arange(a, a + len(values))
                    tables.assign(name, rows, values)


def read_full_tables(ckpt: Path) -> tuple[int, dict[str, torch.Tensor]]:
    """Every row of every table of checkpoint ``ckpt``, whichever layout wrote it (for
    inspection and tests; training loads with ``load_tables``)."""
    num_rows, sources = table_sources(ckpt)
    with safetensors.safe_open(str(sources[0][0]), framework="pt") as f:
        names = [k for k in f.keys() if k != "_none"]
    tables = StateTables(num_rows)
    for name in names:
        tables.add(name)
    load_tables(tables, ckpt)
    return num_rows, {n: tables[n].clone() for n in names}


def _write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def save_detector_state(detector, folder: Path) -> None:
    """The detector's run-wide state (``state_dict``) as ``folder/detector.json``, and its
    tensors (``tensor_state``, where it has any) as ``folder/detector.safetensors``."""
    _write_json(folder / DETECTOR_FILE, detector.state_dict())
    tensors = detector.tensor_state() if hasattr(detector, "tensor_state") else {}
    if tensors:
        tmp = folder / (DETECTOR_TENSORS + ".part")
        safetensors.torch.save_file(
            {k: v.detach().cpu().clone().contiguous() for k, v in tensors.items()}, str(tmp)
        )
        os.replace(tmp, folder / DETECTOR_TENSORS)


def load_detector_state(detector, ckpt: Path, steps: int) -> None:
    """The detector's run-wide state from ``ckpt`` (``detector.json``; a checkpoint written
    before it existed: ``steps``, the optimiser steps the checkpoint's ``trainer_state.json``
    records, and nothing else)."""
    path = ckpt / DETECTOR_FILE
    if not path.is_file():
        detector.load_state_dict({"steps": steps})
        return
    try:
        state = json.loads(path.read_text())
        detector.load_state_dict(state)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path} is not a detector state: {_first_line(e)}") from e
    if state.get("steps") != steps:
        raise CheckpointError(
            f"{path} is not this checkpoint's detector state: it was written at step "
            f"{state.get('steps')}, the checkpoint is of step {steps}"
        )
    tensors_path = ckpt / DETECTOR_TENSORS
    if hasattr(detector, "load_tensor_state") and tensors_path.is_file():
        try:
            tensors = safetensors.torch.load_file(str(tensors_path))
            detector.load_tensor_state(tensors)
        except (ValueError, TypeError, OSError, safetensors.SafetensorError) as e:
            raise CheckpointError(
                f"{tensors_path} is not a detector state: {_first_line(e)}"
            ) from e
