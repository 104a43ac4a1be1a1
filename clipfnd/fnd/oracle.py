"""The oracle detector (docs/methods.md, "Oracle detector"): ``F_i`` = the negatives that share
the anchor's label. The upper bound of any detector; it needs labels and keeps no state."""

from __future__ import annotations

from .base import Detection, DetectionInput, Detector


class Oracle(Detector):
    """``oracle``: flags the same-label negatives (``DetectionInput.truth``) from ``start_mask``."""

    name = "oracle"
    needs_labels = True

    def detect(self, inp: DetectionInput) -> Detection:
        if not (inp.inference or self.masking(inp.epoch)) or inp.truth is None:
            return Detection({t: None for t in self.anchor_types})
        return Detection(dict(inp.truth))
