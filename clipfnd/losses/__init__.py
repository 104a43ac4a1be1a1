"""Loss functions: pure math over features and masks; no communication inside.

``clip`` (mini-batch InfoNCE rows), ``global_contrastive`` (SogCLR / FastCLIP), ``unimodal``
(NT-Xent, DCL, HCL, SSCL over two views of each image)."""

from .clip import contrastive_rows, info_nce_rows
from .global_contrastive import (
    attraction,
    gamma_schedule,
    global_contrastive_loss,
    kept_negatives,
    moving_average,
    negative_ratio,
    temperature_penalty,
    temperature_terms,
)

__all__ = [
    "attraction",
    "contrastive_rows",
    "info_nce_rows",
    "gamma_schedule",
    "global_contrastive_loss",
    "kept_negatives",
    "moving_average",
    "negative_ratio",
    "temperature_penalty",
    "temperature_terms",
]
