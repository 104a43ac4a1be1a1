"""Nothing clipfnd runs downloads: the one place that sets the Hugging Face libraries
(``huggingface_hub``, ``transformers``, ``datasets``) offline. Called before any of them is
imported by data building, evaluation and export."""

from __future__ import annotations

import os

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def stay_offline() -> None:
    """Set every offline switch (a value the user set is kept)."""
    for var in OFFLINE_VARIABLES:
        os.environ.setdefault(var, "1")
