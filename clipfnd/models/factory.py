"""Building CLIP models from open_clip: any open_clip config by name, plus clipfnd's own.

clipfnd's small configs (``clipfnd-tiny-vit``, ``clipfnd-small-vit``) ship in
``clipfnd/models/model_configs`` and are registered with ``open_clip.add_model_config``.

Pretrained weights come through open_clip's own loading, as ``open_clip.create_model`` takes
them: ``pretrained`` a local file or one of open_clip's pretrained tags for the model
(``ViT-B-32`` + ``laion2b_s34b_b79k``, fetched into the Hugging Face cache); or the model
named ``hf-hub:org/repo`` or ``local-dir:DIR`` (config and weights from there). With
``HF_HUB_OFFLINE=1`` only what is cached is used, and a miss says what to fetch.

Weights files are never unpickled unrestricted: open_clip is asked for ``weights_only=True``,
and a local ``pretrained`` file is first opened here the same safe way (safetensors, or
``torch.load(weights_only=True)``, which rebuilds tensors and plain containers only), so that
a file that is not weights is refused in one line before open_clip sees it.
"""

from __future__ import annotations

import difflib
import math
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from safetensors import SafetensorError, safe_open

from ..errors import UserError

CONFIG_DIR = Path(__file__).parent / "model_configs"
_registered = False


def register_builtin_configs() -> None:
    global _registered
    if not _registered:
        open_clip.add_model_config(CONFIG_DIR)
        _registered = True


def available_models() -> list[str]:
    register_builtin_configs()
    return open_clip.list_models()


SCHEMAS = ("hf-hub:", "local-dir:")  # model names open_clip loads config and weights from
EXPECTED_WEIGHTS = (
    "expected a state dict as .safetensors, or a torch file loadable with weights_only=True"
)
# what open_clip's loading raises on a user's input: weights missing, unreachable or broken
LOAD_ERRORS = (pickle.UnpicklingError, SafetensorError, EOFError, OSError, RuntimeError, ValueError)


def check_model_name(name: str) -> None:
    """Refuse an unknown model name with the closest known names."""
    if name.startswith(SCHEMAS):
        return
    models = available_models()
    if name not in models:
        close = difflib.get_close_matches(name, models, n=5, cutoff=0.4)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UserError(
            f"unknown model name {name!r} (model.name): not an open_clip config or one of "
            f"clipfnd's ({', '.join(p.stem for p in sorted(CONFIG_DIR.glob('*.json')))}).{hint}"
        )


@dataclass
class ClipBundle:
    model: torch.nn.Module
    preprocess_train: Any
    preprocess_val: Any
    tokenizer: Any
    name: str


def create_clip(
    name: str,
    *,
    pretrained: str | None = None,
    init_logit_scale: float | None = None,
    device: str | torch.device = "cpu",
) -> ClipBundle:
    """An open_clip CLIP model, its train/val image transforms and its tokenizer.

    ``pretrained``: a local file (state dict, ``.pt``/``.bin``/``.safetensors``) or one of
    open_clip's pretrained tags for ``name``; None with ``name`` ``hf-hub:``/``local-dir:``
    (see the module docstring).
    """
    check_model_name(name)
    check_pretrained(name, pretrained)
    try:
        model, preprocess_train, preprocess_val = open_clip.create_model_and_transforms(
            name, pretrained=pretrained, device=device, output_dict=True, weights_only=True
        )
    except (*LOAD_ERRORS, AssertionError) as e:  # open_clip asserts on a pos_embed width
        if pretrained is None and not name.startswith(SCHEMAS):
            raise
        if pretrained is not None and Path(pretrained).is_file():
            other = _weights_of_another_model(name, pretrained)
            if other is not None:
                raise UserError(other) from None
        raise UserError(_not_loaded(name, pretrained, e)) from e
    if init_logit_scale is not None:
        with torch.no_grad():
            model.logit_scale.fill_(float(init_logit_scale))
    tokenizer = open_clip.get_tokenizer(name)
    return ClipBundle(model, preprocess_train, preprocess_val, tokenizer, name)


def check_pretrained(name: str, pretrained: str | None) -> None:
    """``pretrained`` must be a file or a tag open_clip knows for ``name``."""
    if pretrained is None:
        return
    if name.startswith(SCHEMAS):
        raise UserError(
            f"model.pretrained={pretrained!r} with model.name={name!r}: the weights come from "
            f"{name.split(':', 1)[0]}; leave model.pretrained unset"
        )
    if Path(pretrained).is_file():
        check_weights_file(pretrained)
        return
    tags = open_clip.list_pretrained_tags_by_model(name)
    if pretrained in tags:
        return
    looks_like_path = any(c in pretrained for c in "/\\") or Path(pretrained).suffix != ""
    what = "no such file" if looks_like_path else "neither a file nor a pretrained tag"
    known = f"its tags: {', '.join(tags)}" if tags else "open_clip has no pretrained tags for it"
    raise UserError(f"model.pretrained={pretrained!r} for model {name!r}: {what} ({known})")


def check_weights_file(path: str) -> None:
    """Open a local weights file the way open_clip will, but safely, and refuse in one line
    one that is not weights: ``.safetensors`` by its header, anything else with
    ``torch.load(weights_only=True)`` (memory-mapped where the format allows). It must hold a
    state dict, or a checkpoint with one under ``state_dict``. numpy's ``.npz``/``.npy``
    (big_vision weights) are left to open_clip, which reads them without pickle."""
    suffix = Path(path).suffix
    if suffix in (".npz", ".npy"):
        return
    if Path(path).stat().st_size == 0:
        raise UserError(f"model.pretrained={path}: the file is empty; {EXPECTED_WEIGHTS}")
    try:
        if suffix == ".safetensors":
            with safe_open(path, framework="pt") as f:
                found = "no tensors" if not list(f.keys()) else None
        else:
            with warnings.catch_warnings():  # e.g. on the pickle protocol: the verdict is ours
                warnings.simplefilter("ignore")
                obj = torch.load(
                    path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path)
                )
            found = _not_a_state_dict(obj)
    except Exception as e:  # on garbage the unpickler raises anything (IndexError, ...)
        found = f"unreadable: {_reason(e)}"
    if found is not None:
        raise UserError(f"model.pretrained={path}: {found}; {EXPECTED_WEIGHTS}")


def _weights_of_another_model(name: str, path: str) -> str | None:
    """When the weights in ``path`` are of another shape than model ``name``: which model
    they belong to, in one line (None: they are not an open_clip CLIP's, or fit ``name``)."""
    from .identify import models_of

    try:
        if Path(path).suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(path)
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                state = torch.load(path, map_location="cpu", weights_only=True)
        if isinstance(state, Mapping) and isinstance(state.get("state_dict"), Mapping):
            state = state["state_dict"]
        state = {k.removeprefix("module."): v for k, v in state.items()}
    except Exception:  # check_weights_file read it already; anything else: no guess
        return None
    names, shape = models_of(state)
    if shape is None or name in names:
        return None
    if names:
        more = (
            f" (or {', '.join(names[1:4])}{', ...' if len(names) > 4 else ''})" if names[1:] else ""
        )
        return (
            f"the weights in {path} are those of model {names[0]}{more}, not {name}: "
            f"name that model (model.name / --model {names[0]})"
        )
    return f"the weights in {path} do not fit model {name}: they hold {shape}, which no open_clip model config matches"


def _not_a_state_dict(obj: Any) -> str | None:
    """What ``obj`` holds when it is no state dict (None when it is one)."""
    state = obj.get("state_dict", obj) if isinstance(obj, Mapping) else obj
    if not isinstance(state, Mapping):
        return f"it holds a {type(state).__name__}, not a state dict"
    if not state or not all(torch.is_tensor(v) for v in state.values()):
        return "it holds a dict that is not a state dict (names -> tensors)"
    return None


def _reason(e: Exception) -> str:
    """The first line of ``e``; for torch's weights-only refusal, of its cause (the pickle
    instruction or global it refused), which torch keeps as the context."""
    if isinstance(e, pickle.UnpicklingError) and e.__context__ is not None:
        e = e.__context__
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _not_loaded(name: str, pretrained: str | None, e: Exception) -> str:
    """What to do when open_clip could not load a pretrained model."""
    import os

    from huggingface_hub import constants

    what = f"{name} with pretrained={pretrained}" if pretrained else name
    repo = None
    if name.startswith("hf-hub:"):
        repo = name[len("hf-hub:") :]
    elif pretrained and not Path(pretrained).is_file():
        repo = (open_clip.get_pretrained_cfg(name, pretrained) or {}).get("hf_hub", "").strip("/")
    first = _reason(e).split(" Last error:")[0].rstrip(".")  # open_clip's wrapper, not the cause
    msg = f"could not load {what}: {first}"
    if isinstance(e, (pickle.UnpicklingError, SafetensorError)):
        return f"{msg}; {EXPECTED_WEIGHTS}"
    if name.startswith("local-dir:"):
        return msg + " (local-dir: needs open_clip_config.json and the weights in that folder)"
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    fetch = f" (e.g. `hf download {repo}`)" if repo else ""
    if offline:
        return (
            msg + f". HF_HUB_OFFLINE is set and it is not in the Hugging Face cache "
            f"({constants.HF_HUB_CACHE}): fetch it once with network access{fetch}, then run "
            "offline"
        )
    return msg + f". Check the network access to the Hugging Face Hub, or fetch it{fetch}"


def lock_towers(
    model: torch.nn.Module,
    *,
    lock_image: bool = False,
    image_unlocked_groups: int = 0,
    image_freeze_bn_stats: bool = False,
    lock_text: bool = False,
    text_unlocked_layers: int = 0,
    text_freeze_layer_norm: bool = True,
) -> None:
    """Freeze the image and/or text tower with open_clip's own ``lock_image_tower`` /
    ``lock_text_tower`` (as its ``--lock-image`` / ``--lock-text`` flags do)."""
    if lock_image:
        model.lock_image_tower(
            unlocked_groups=image_unlocked_groups, freeze_bn_stats=image_freeze_bn_stats
        )
    if lock_text:
        if not hasattr(model, "lock_text_tower"):
            raise UserError(f"{type(model).__name__} has no text tower to lock (model.lock_text)")
        model.lock_text_tower(
            unlocked_layers=text_unlocked_layers, freeze_layer_norm=text_freeze_layer_norm
        )


def set_grad_checkpointing(model: torch.nn.Module, name: str) -> None:
    """Activation checkpointing in every tower that supports it (open_clip's towers do)."""
    target = getattr(model, "module", model)
    if not hasattr(target, "set_grad_checkpointing"):
        raise UserError(
            f"train.grad_checkpointing: model {name!r} ({type(target).__name__}) does not "
            "support activation checkpointing"
        )
    try:
        target.set_grad_checkpointing(True)
    except (AssertionError, NotImplementedError) as e:
        raise UserError(
            f"train.grad_checkpointing: model {name!r} does not support activation "
            f"checkpointing ({e or type(e).__name__})"
        ) from e


def model_config(name: str) -> dict[str, Any]:
    register_builtin_configs()
    cfg = open_clip.get_model_config(name)
    if cfg is None:
        raise UserError(f"no open_clip config named {name!r}")
    return cfg


MAX_LOGIT_SCALE = math.log(100.0)
