"""What every false-negative detector provides (docs/methods.md, "Removing detected false
negatives"): similarities, dataset indices, labels and the epoch in; flags and the table rows
to commit out. A detector never edits a loss and never writes a table itself.

Adding a detector: a class with ``from_config`` and one line in ``DETECTORS``
(``clipfnd/fnd/__init__.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

EmbedFn = Callable[[], "tuple[torch.Tensor, torch.Tensor]"]

if TYPE_CHECKING:
    from ..config import FNDConfig
    from ..state import StateTables


@dataclass
class DetectionInput:
    """What a detector sees of one step, for this rank's anchors.

    Shape (``n = K b`` rows: ``K = rows_per_sample`` similarity rows per sample, 1 bimodal,
    2 unimodal, stacked view after view): sims ``{anchor type: [n, M]}`` detached
    similarities (only for detectors that ask for them, on epochs they are active); pos
    ``[n]`` positive columns; index ``[b]`` dataset indices; truth ``{anchor type: [n, M]}``
    same-label negatives (when labels are known and needed, else None); not_negative
    ``[n, M]`` columns that are no negative (copies of the anchor's own sample; unimodal, the
    anchor's own column) or None; num_negatives ``|N_i|``, one number or ``[b]``;
    columns_index ``[M]`` the dataset index of every column (or None).
    """

    sims: dict[str, torch.Tensor]
    pos: torch.Tensor
    index: torch.Tensor
    truth: dict[str, torch.Tensor] | None
    not_negative: torch.Tensor | None
    num_negatives: int | torch.Tensor
    epoch: int
    rows_per_sample: int = 1
    columns_index: torch.Tensor | None = None


@dataclass
class Detection:
    flags: dict[str, torch.Tensor | None]  # per anchor type: negatives to remove (None: none)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # table rows, not yet written


class Detector(ABC):
    """A false-negative detector with its schedule: it learns from epoch ``start_update`` on
    and its flags are used from epoch ``start_mask`` on."""

    name: ClassVar[str]
    modes: ClassVar[tuple[str, ...]] = ("clip", "simclr")  # the training modes it can serve
    needs_similarities: ClassVar[bool] = False
    needs_labels: ClassVar[bool] = False

    def __init__(self, anchor_types: tuple[str, ...], start_update: int = 0, start_mask: int = 0):
        self.anchor_types = anchor_types
        self.start_update = start_update
        self.start_mask = start_mask

    @classmethod
    def from_config(
        cls, fnd: FNDConfig, tables: StateTables, anchor_types: tuple[str, ...], **run
    ) -> Detector:
        """The detector the ``fnd`` config section describes. ``run`` holds what the run
        knows beyond it (``seed``, ``last_epoch``, ``progress``), for detectors that need it."""
        return cls(anchor_types, start_update=fnd.start_update, start_mask=fnd.start_mask)

    def masking(self, epoch: int) -> bool:
        return epoch >= self.start_mask

    def updating(self, epoch: int) -> bool:
        return False

    @abstractmethod
    def detect(self, inp: DetectionInput) -> Detection: ...

    def start_epoch(self, epoch: int, embed: EmbedFn, fresh: bool) -> dict[str, float]:
        """Called on every process at the start of each epoch, before its first step.

        ``embed()`` returns ``(index [N'], features [N', d])`` of the whole training set
        (un-augmented, all processes together; the same on every process). ``fresh`` is False
        when a run resumes inside the epoch (the tables already hold what this call wrote).
        Returns scalars for the metrics line. Default: nothing to do.
        """
        return {}

    def threshold_metrics(self) -> dict[str, float]:
        """Scalars about the detector's state for the metrics line (none by default)."""
        return {}


class NoDetector(Detector):
    """``none``: nothing is flagged."""

    name = "none"

    def masking(self, epoch: int) -> bool:
        return False

    def detect(self, inp: DetectionInput) -> Detection:
        return Detection({t: None for t in self.anchor_types})
