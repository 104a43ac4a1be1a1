"""False-negative detectors behind one interface (``Detector``), by name: similarities,
dataset indices, labels and the epoch in; flags and table rows out. Detection quality
(counts, precision, recall against labels) is in ``quality``. ``build_detector``: the run's
detector from its config (training's objective and the report both build it so)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ..config import ConfigError
from .base import Detection, DetectionInput, Detector, EpochStart, NoDetector
from .glofnd import GloFND
from .ifnd import IFND
from .oracle import Oracle
from .quality import detection_counts, detection_metrics, same_label

if TYPE_CHECKING:
    from ..config import Config
    from ..state import StateTables

DETECTORS: dict[str, type[Detector]] = {d.name: d for d in (NoDetector, GloFND, Oracle, IFND)}

# the anchor types of each training mode: image and text anchors (CLIP), one view (SimCLR)
ANCHOR_TYPES: dict[str, tuple[str, ...]] = {"clip": ("img", "txt"), "simclr": ("view",)}


def build_detector(
    cfg: Config,
    tables: StateTables,
    has_labels: bool,
    anchor_types: tuple[str, ...] | None = None,
) -> Detector:
    """The detector ``cfg.fnd`` names, its tables added to ``tables``, for anchor types
    ``anchor_types`` (default: ``ANCHOR_TYPES[cfg.mode]``). ``ConfigError`` when it needs
    labels and the data has none (``has_labels``)."""
    detector_cls = DETECTORS[cfg.fnd.detector]
    if detector_cls.needs_labels and not has_labels:
        raise ConfigError(
            f"fnd.detector={cfg.fnd.detector} needs labels, and the training data has none "
            "(its manifest lists no label_names)"
        )
    return detector_cls.from_config(
        cfg.fnd,
        tables,
        ANCHOR_TYPES[cfg.mode] if anchor_types is None else anchor_types,
        seed=cfg.seed,
        last_epoch=cfg.train.epochs - 1,
        progress=cfg.train.progress,
    )


__all__ = [
    "ANCHOR_TYPES",
    "DETECTORS",
    "Detection",
    "DetectionInput",
    "EpochStart",
    "Detector",
    "GloFND",
    "IFND",
    "NoDetector",
    "Oracle",
    "build_detector",
    "detection_counts",
    "detection_metrics",
    "same_label",
]
