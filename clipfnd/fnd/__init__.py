"""False-negative detectors: similarities (and labels) in, masks out."""

from .glofnd import GloFND
from .oracle import detection_counts, detection_metrics, same_label

__all__ = ["GloFND", "detection_counts", "detection_metrics", "same_label"]
