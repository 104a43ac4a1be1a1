"""Checkpoints of a run sharded with FSDP (``accelerate launch --use_fsdp --fsdp_version 2``).

What Accelerate's ``save_state`` writes for DDP (the weights, the optimiser, the RNG states),
written here for a model whose parameters each process holds only a shard of:

- ``model.safetensors``: the whole weights, gathered to the main process (as under DDP, with
  0-d parameters such as the temperature 0-d again), so that ``clipfnd eval`` and ``clipfnd export`` read an FSDP
  checkpoint as any other;
- ``optimizer_fsdp/``: the optimiser state, sharded: ``torch.distributed.checkpoint`` with its
  safetensors storage, each process writing its own shard (the largest part of a checkpoint:
  AdamW keeps two tensors per parameter), and a resume on any number of processes reading the
  pieces it holds; its layout (``optimizer_fsdp.json``) is JSON. Nothing is pickled: DCP's
  safetensors reader takes the layout from the files' headers;
- ``random_states_{rank}.pkl``: each process's RNG states, through Accelerate (loaded with
  ``weights_only``, as under DDP).

The per-sample tables, the schedule, the detector and the loader's position are written by
``save_resume`` as under DDP.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import safetensors.torch
import torch

WEIGHTS_FILE = "model.safetensors"
OPTIMIZER_DIR = "optimizer_fsdp"
OPTIMIZER_LAYOUT = "optimizer_fsdp.json"


def is_sharded(accelerator) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def _torch_optimizer(optimizer):
    return getattr(optimizer, "optimizer", optimizer)  # Accelerate's wrapper


def _flatten(osd: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """An optimiser state dict (keyed by parameter name) as flat tensors and a JSON layout."""
    tensors, values = {}, {}
    for name, state in osd["state"].items():
        for key, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{name}/{key}"] = value
            else:
                values[f"{name}/{key}"] = value
    return tensors, {"param_groups": osd["param_groups"], "values": values}


def _unflatten(tensors: dict[str, torch.Tensor], layout: dict[str, Any]) -> dict[str, Any]:
    state: dict[str, dict[str, Any]] = {}
    for flat, value in [*tensors.items(), *layout["values"].items()]:
        name, key = flat.rsplit("/", 1)
        state.setdefault(name, {})[key] = value
    return {"state": state, "param_groups": layout["param_groups"]}


def save(accelerator, model: torch.nn.Module, optimizer, folder: Path) -> None:
    """Write the weights, the sharded optimiser state and the RNG states (every process)."""
    from accelerate.checkpointing import save_accelerator_state
    from torch.distributed.checkpoint import HuggingFaceStorageWriter
    from torch.distributed.checkpoint import save as dcp_save
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    # the collectives first (a write that fails on one process after them hangs no other)
    whole = get_model_state_dict(
        model, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    tensors, layout = _flatten(get_optimizer_state_dict(model, _torch_optimizer(optimizer)))
    dcp_save(  # DCP raises a failure on any process on every process
        tensors,
        storage_writer=HuggingFaceStorageWriter(str(folder / OPTIMIZER_DIR), save_distributed=True),
    )
    if accelerator.is_main_process:
        scalars = getattr(accelerator.unwrap_model(model), "clipfnd_scalar_parameters", ())
        weights = {k: v.detach().contiguous() for k, v in whole.items()}
        weights = {k: v.reshape(()) if k in scalars else v for k, v in weights.items()}
        safetensors.torch.save_file(weights, str(folder / WEIGHTS_FILE), metadata={"format": "pt"})
        (folder / OPTIMIZER_LAYOUT).write_text(json.dumps(layout, indent=1, sort_keys=True))
    save_accelerator_state(
        str(folder), [], [], [], [], accelerator.process_index, 0, scaler=accelerator.scaler
    )


def written_sharded(folder: Path) -> bool:
    """Whether checkpoint ``folder`` was written by a run under FSDP."""
    return (folder / OPTIMIZER_DIR).is_dir()


def load(accelerator, model: torch.nn.Module, optimizer, folder: Path) -> None:
    """Load what ``save`` wrote (every process), into a model prepared with FSDP on any number
    of processes (each reads the pieces it holds), or into one under DDP (each reads all)."""
    from accelerate.checkpointing import load_accelerator_state
    from torch.distributed.checkpoint import HuggingFaceStorageReader
    from torch.distributed.checkpoint import load as dcp_load
    from torch.distributed.checkpoint.state_dict import (
        get_optimizer_state_dict,
        set_optimizer_state_dict,
    )

    layout = read_layout(folder)
    opt = _torch_optimizer(optimizer)
    tensors, _ = _flatten(get_optimizer_state_dict(model, opt))  # the pieces this process holds
    reader = HuggingFaceStorageReader(str(folder / OPTIMIZER_DIR))
    saved = reader.read_metadata().state_dict_metadata
    check_complete(tensors, saved, folder / OPTIMIZER_DIR)  # before anything is loaded
    _load_weights(accelerator, model, folder)
    reshaped = {}  # a 0-d temperature state here, saved as a 1-element vector under FSDP
    for key, t in tensors.items():
        size = getattr(saved.get(key), "size", None)
        if size is not None and tuple(size) != tuple(t.shape) and not hasattr(t, "to_local"):
            reshaped[key] = t.shape
            tensors[key] = torch.empty(tuple(size), dtype=t.dtype)
    dcp_load(tensors, storage_reader=reader)
    for key, shape in reshaped.items():
        tensors[key] = tensors[key].reshape(shape)
    set_optimizer_state_dict(model, opt, _unflatten(tensors, layout))
    load_accelerator_state(
        str(folder), [], [], [], [], accelerator.process_index, scaler=accelerator.scaler
    )


def read_layout(folder: Path) -> dict[str, Any]:
    """``optimizer_fsdp.json``: the optimiser's parameter groups and its non-tensor values,
    checked (``CheckpointError`` naming the file and what is wrong)."""
    from ..errors import CheckpointError

    path = folder / OPTIMIZER_LAYOUT
    try:
        layout = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not an optimiser layout: {e}") from None
    if not isinstance(layout, dict):
        raise CheckpointError(f"{path} is not an optimiser layout: a {type(layout).__name__}")
    groups, values = layout.get("param_groups"), layout.get("values")
    if not (isinstance(groups, list) and groups and all(isinstance(g, dict) for g in groups)):
        raise CheckpointError(f"{path}: 'param_groups' is not a list of parameter groups")
    if not isinstance(values, dict) or not all(isinstance(k, str) and "/" in k for k in values):
        raise CheckpointError(f"{path}: 'values' is not a mapping of 'parameter/key' to values")
    return layout


def check_complete(tensors: dict[str, torch.Tensor], saved: dict[str, Any], where: Path) -> None:
    """Every optimiser tensor this process loads is in the sharded checkpoint whole: its
    global shape and pieces covering all of it (a shard file gone would leave pieces out, and
    DCP would fail deep in a collective with a size mismatch on every process)."""
    from ..errors import CheckpointError

    for key, t in tensors.items():
        meta = saved.get(key)
        if meta is None or not hasattr(meta, "chunks"):
            raise CheckpointError(
                f"{where} lacks the optimiser state {key} (a shard file missing or replaced?)"
            )
        size = tuple(getattr(meta, "size", ()))
        covered = sum(math.prod(c.sizes) for c in meta.chunks)
        if covered != math.prod(size) or math.prod(size) != t.numel():
            raise CheckpointError(
                f"{where}: the optimiser state {key} is incomplete ({covered} of "
                f"{t.numel()} values in its shard files; one missing or replaced?)"
            )


def load_unsharded(accelerator, model: torch.nn.Module, optimizer, folder: Path) -> None:
    """Load a checkpoint that a run under DDP wrote (Accelerate's ``save_state``: the weights,
    ``optimizer.bin`` keyed by parameter position, the RNG states) into a model prepared with
    FSDP (every process)."""
    from accelerate.checkpointing import load_accelerator_state
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_optimizer_state_dict,
    )

    _load_weights(accelerator, model, folder)
    opt = _torch_optimizer(optimizer)
    saved = torch.load(folder / "optimizer.bin", map_location="cpu", weights_only=True)
    params = list(accelerator.unwrap_model(model).named_parameters())
    names = {id(p): n for n, p in params}
    shapes = {n: p.shape for n, p in params}
    order = [names[id(p)] for g in opt.param_groups for p in g["params"]]
    state = {
        order[int(i)]: {
            k: v if k == "step" else _shaped(v, shapes[order[int(i)]]) for k, v in st.items()
        }
        for i, st in saved["state"].items()
    }
    groups = [{**g, "params": [order[int(i)] for i in g["params"]]} for g in saved["param_groups"]]
    set_optimizer_state_dict(
        model,
        opt,
        {"state": state, "param_groups": groups},
        options=StateDictOptions(full_state_dict=True),
    )
    load_accelerator_state(
        str(folder), [], [], [], [], accelerator.process_index, scaler=accelerator.scaler
    )


def _load_weights(accelerator, model: torch.nn.Module, folder: Path) -> None:
    """The whole weights of ``folder`` into ``model`` (FSDP keeps the pieces it shards here),
    the temperature in the shape the model has (0-d, or a 1-element vector under FSDP)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

    shapes = {n: p.shape for n, p in accelerator.unwrap_model(model).named_parameters()}
    weights = safetensors.torch.load_file(str(folder / WEIGHTS_FILE))
    weights = {k: _shaped(v, shapes[k]) if k in shapes else v for k, v in weights.items()}
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))


def _shaped(value, shape: torch.Size):
    """A saved tensor in the shape the live parameter has, where only that differs: a 0-d
    parameter is a 1-element vector while FSDP trains (``build._prepare_for_fsdp``) and 0-d in
    every checkpoint. Other values (a step count, a tensor of another size) stay as they are."""
    if torch.is_tensor(value) and tuple(value.shape) != tuple(shape):
        if value.numel() == 1 == math.prod(shape):
            return value.reshape(shape)
    return value
