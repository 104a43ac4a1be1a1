"""Encoders: open_clip CLIP models by name, and clipfnd's own tiny configs."""

from .factory import (
    MAX_LOGIT_SCALE,
    ClipBundle,
    available_models,
    check_model_name,
    create_clip,
    lock_towers,
    model_config,
    register_builtin_configs,
    set_grad_checkpointing,
)

__all__ = [
    "MAX_LOGIT_SCALE",
    "ClipBundle",
    "available_models",
    "check_model_name",
    "create_clip",
    "lock_towers",
    "model_config",
    "register_builtin_configs",
    "set_grad_checkpointing",
]
