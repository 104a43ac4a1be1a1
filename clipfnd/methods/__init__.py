"""Training objectives behind one interface (``Method``), by name.

Each owns its temperature (how ``logit_scale`` starts, whether and where it learns, its
clamp), its per-sample tables and its loss from features and masks. The training step never
branches on a method's name: adding one is a class and a line in ``METHODS``.
"""

from __future__ import annotations

from .base import AnchorRows, Method, MethodOutput, TemperaturePolicy
from .clip import Clip
from .global_contrastive import FastCLIPv3, SogCLR
from .unimodal import DCL, HCL, SSCL, SimCLR

METHODS: dict[str, type[Method]] = {
    m.name: m for m in (Clip, SogCLR, FastCLIPv3, SimCLR, DCL, HCL, SSCL)
}

__all__ = [
    "DCL",
    "HCL",
    "METHODS",
    "SSCL",
    "AnchorRows",
    "Clip",
    "FastCLIPv3",
    "Method",
    "MethodOutput",
    "SimCLR",
    "SogCLR",
    "TemperaturePolicy",
]
