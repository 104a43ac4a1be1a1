"""What every false-negative detector provides (docs/methods.md, "Removing detected false
negatives"): similarities, dataset indices, labels and the epoch in; flags and the table rows
to commit out. A detector never edits a loss and never writes a table itself: ``detect``
returns the rows, which the training step commits in one synchronised call, and
``start_epoch`` returns whole columns (IFND's clusters, confidences and pseudo-labels, the same
on every process), which the training loop writes before the epoch's first step.

Adding a detector: a class with ``from_config`` and one line in ``DETECTORS``
(``clipfnd/fnd/__init__.py``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

from ..config import MaskStart

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
    # outside training (the report): flags from the saved state as it is, masking on, nothing
    # estimated from this input and no update
    inference: bool = False
    measure: bool = False  # a logged step: also the scalars that cost extra (Detection.metrics)
    # detached features {anchor type: (anchors [n, d], columns [M, d])} (detectors that ask
    # for them) and every column's dataset index [M]
    features: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
    column_ids: torch.Tensor | None = None


@dataclass
class Detection:
    flags: dict[str, torch.Tensor | None]  # per anchor type: negatives to remove (None: none)
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # table rows, not yet written
    # what the step adds to the detector's run-wide state, summed over micro-batches and
    # processes before ``after_step`` (GloFND: flagged and negatives counts per anchor type)
    stats: dict[str, torch.Tensor] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)  # this step's, for the log line


@dataclass
class EpochStart:
    """What a detector's epoch start hands the training loop: scalars for a metrics line of
    their own, and whole columns of its tables (every dataset row, the same on every process)
    that the loop writes (``write``) before the epoch's first step."""

    metrics: dict[str, float] = field(default_factory=dict)
    columns: dict[str, torch.Tensor] = field(default_factory=dict)

    def write(self, tables: StateTables) -> None:
        """Set each column in ``tables`` (replicated: every row; sharded: the rows this
        process holds)."""
        for name, values in self.columns.items():
            tables.assign(name, torch.arange(tables.num_rows), values)


class Detector(ABC):
    """A false-negative detector with its schedule: it learns from epoch ``start_update`` on,
    and its flags are used from ``start_mask`` on (an epoch, a share of the run's optimiser
    steps, or, for detectors that measure their calibration, ``auto``).

    Besides its per-sample tables a detector keeps a little run-wide state (``state_dict``):
    the optimiser steps it has seen, the step at which masking started, and what a subclass
    adds; it changes only in ``after_step``, with numbers summed over every process, so it
    is the same everywhere, and checkpoints hold it."""

    name: ClassVar[str]
    modes: ClassVar[tuple[str, ...]] = ("clip", "simclr")  # the training modes it can serve
    needs_similarities: ClassVar[bool] = False
    needs_features: ClassVar[bool] = False  # DetectionInput.features (GloFND's queue)
    needs_labels: ClassVar[bool] = False
    calibrates: ClassVar[bool] = False  # measures its flagged share: start_mask=auto possible

    def __init__(
        self,
        anchor_types: tuple[str, ...],
        start_update: int = 0,
        start_mask: int | float | str = 0,
    ):
        self.anchor_types = anchor_types
        self.start_update = start_update
        self.mask_start = MaskStart.parse(start_mask)
        if self.mask_start.kind == "auto" and not self.calibrates:
            raise ValueError(
                f"fnd.start_mask=auto needs a detector that measures its calibration (glofnd); "
                f"{self.name} does not: give an epoch or a share of training"
            )
        self.total_steps: int | None = None
        self.steps = 0  # optimiser steps taken
        self.masked_from: int | None = None  # the first step whose loss used flags

    @classmethod
    def from_config(
        cls, fnd: FNDConfig, tables: StateTables, anchor_types: tuple[str, ...], **run
    ) -> Detector:
        """The detector the ``fnd`` config section describes. ``run`` holds what the run
        knows beyond it (``seed``, ``last_epoch``, ``progress``), for detectors that need it."""
        return cls(anchor_types, start_update=fnd.start_update, start_mask=fnd.start_mask)

    def check_batch(self, rows: int, negatives_per_row: int) -> None:
        """At start-up: whether the detector can work with a global batch of ``rows``
        similarity rows per anchor type, each with ``negatives_per_row`` negatives (a
        ``ValueError`` saying why not; a warning where it works poorly). Default: any."""
        return None

    def plan(self, total_steps: int, steps_per_epoch: int) -> None:
        """The run's length in optimiser steps (a masking start given as a share of training
        is a step of it; ``auto`` measures windows in steps)."""
        self.total_steps = total_steps

    def masking(self, epoch: int) -> bool:
        """Whether the step about to run uses flags."""
        kind = self.mask_start.kind
        if kind == "epoch":
            return epoch >= self.mask_start.value
        if kind == "fraction":
            if self.total_steps is None:
                raise RuntimeError("a masking start as a share of training needs plan()")
            return self.steps + 1 >= self.mask_start.first_step(self.total_steps)
        return self.masked_from is not None or self.ready_to_mask()

    def ready_to_mask(self) -> bool:
        """``auto``: whether the calibration condition has been met (subclasses that calibrate)."""
        return False

    def after_step(self, stats: dict[str, torch.Tensor], masked: bool) -> dict[str, float]:
        """An optimiser step was taken: ``stats`` its detections' ``stats`` summed over
        micro-batches and processes; ``masked`` whether its loss used flags. Returns scalars for
        the metrics (the step masking started at, once)."""
        self.steps += 1
        if masked and self.masked_from is None:
            self.masked_from = self.steps
            return {"fnd/mask_start_step": float(self.steps)}
        return {}

    def state_dict(self) -> dict[str, float | int | None]:
        return {"steps": self.steps, "masked_from": self.masked_from}

    def load_state_dict(self, state: dict) -> None:
        """What ``state_dict`` gave; ``ValueError`` naming a key that is missing, unknown or
        wrong (every value is checked before any is used: a hand-edited file is refused, not
        half-loaded)."""
        if not isinstance(state, dict):
            raise ValueError(f"detector state is a {type(state).__name__}, not a mapping")
        unknown = sorted(set(state) - set(self.state_dict()))
        if unknown:
            raise ValueError(f"detector state has unknown keys {unknown} (not {self.name}'s)")
        steps = _int(state, "steps")
        masked_from = _int(state, "masked_from", none=True)
        if masked_from is not None and not 1 <= masked_from <= steps:
            raise ValueError(
                f"detector state masked_from={masked_from} is not a step of the {steps} taken"
            )
        self.steps, self.masked_from = steps, masked_from

    def updating(self, epoch: int) -> bool:
        return False

    @abstractmethod
    def detect(self, inp: DetectionInput) -> Detection: ...

    def epoch_report(self) -> str | None:
        """At an epoch's end: a warning when the epoch's flags were far from calibrated (once
        a run at most; None: nothing to say)."""
        return None

    def start_epoch(self, epoch: int, embed: EmbedFn, fresh: bool) -> EpochStart:
        """Called on every process at the start of each epoch, before its first step.

        ``embed()`` returns ``(index [N'], features [N', d])`` of the whole training set
        (un-augmented, all processes together; the same on every process). ``fresh`` is False
        when a run resumes inside the epoch (the tables already hold what this epoch's start
        wrote). Returns the scalars for the metrics line and the columns to write; it writes
        nothing itself. Default: nothing to do.
        """
        return EpochStart()

    def state_metrics(self) -> dict[str, float]:
        """Scalars about the detector's state for the metrics line (none by default)."""
        return {}

    def table_names(self) -> tuple[str, ...]:
        """The per-sample tables that are this detector's own (those it added; none by
        default)."""
        return ()

    def unseen_value(self, name: str, train: StateTables) -> float | None:
        """What this detector's table ``name`` holds for a sample without a row of its own
        (outside the training data: the report on another split), from the training set's
        tables ``train``. None (the default): the table's initial value."""
        return None


class NoDetector(Detector):
    """``none``: nothing is flagged."""

    name = "none"

    def masking(self, epoch: int) -> bool:
        return False

    def detect(self, inp: DetectionInput) -> Detection:
        return Detection({t: None for t in self.anchor_types})


def _int(state: dict, key: str, none: bool = False) -> int | None:
    value = state.get(key)
    if value is None and none:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"detector state {key}={value!r} is not an integer >= 0")
    return value
