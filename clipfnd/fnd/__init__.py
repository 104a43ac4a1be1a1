"""False-negative detectors behind one interface (``Detector``), by name: similarities,
dataset indices, labels and the epoch in; flags and table rows out. Detection quality
(counts, precision, recall against labels) is in ``quality``."""

from __future__ import annotations

from .base import Detection, DetectionInput, Detector, NoDetector
from .glofnd import GloFND
from .ifnd import IFND
from .oracle import Oracle
from .quality import detection_counts, detection_metrics, same_label

DETECTORS: dict[str, type[Detector]] = {d.name: d for d in (NoDetector, GloFND, Oracle, IFND)}

__all__ = [
    "DETECTORS",
    "Detection",
    "DetectionInput",
    "Detector",
    "GloFND",
    "IFND",
    "NoDetector",
    "Oracle",
    "detection_counts",
    "detection_metrics",
    "same_label",
]
