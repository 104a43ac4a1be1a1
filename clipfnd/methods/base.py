"""What every training objective provides: its temperature, its tables, its loss.

A method sees, for each anchor type (bimodal: ``img`` anchors against the gathered texts and
``txt`` anchors against the gathered images), one ``AnchorRows``: this rank's anchors, the
candidates with gradient, the positive's column, and the columns that are not negatives
(flagged false negatives, copies of the anchor's own sample). It never gathers, never
detects, never writes a table: it returns the rows it wants written, and the training step
commits them when the optimiser step is really taken.

Adding a method: a class here or in a file of its own, and one line in ``METHODS``
(``clipfnd/methods/__init__.py``).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, ClassVar

import torch

if TYPE_CHECKING:
    from ..config import Config
    from ..state import StateTables


@dataclass
class AnchorRows:
    """One anchor type's similarity rows.

    Shape: anchors ``[b, d]`` (this rank's, with gradient); others ``[M, d]`` (the gathered
    candidates, with gradient); pos ``[b]`` the positive's column; fn_mask ``[b, M]`` bool,
    flagged false negatives (or None); not_negative ``[b, M]`` bool, columns that are neither
    positive nor negative (or None).
    """

    anchors: torch.Tensor
    others: torch.Tensor
    pos: torch.Tensor
    fn_mask: torch.Tensor | None = None
    not_negative: torch.Tensor | None = None


@dataclass
class MethodOutput:
    loss: torch.Tensor
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # table rows to commit
    metrics: dict[str, float] = field(default_factory=dict)


class Method(ABC):
    """A training objective.

    Args:
        cfg: the run config (``loss`` for the method's knobs, ``fnd`` for how flagged
            negatives are removed).
        tables: the per-sample tables; a method with state adds its own in ``__init__``.
        anchor_types: the anchor types the loss will see (``("img", "txt")`` bimodal).
    """

    name: ClassVar[str]
    own_temperature_group: ClassVar[bool] = False  # logit_scale in a parameter group of its own

    def __init__(self, cfg: Config, tables: StateTables, anchor_types: tuple[str, ...]):
        self.cfg = cfg
        self.tables = tables
        self.anchor_types = anchor_types
        self.removal = cfg.fnd.removal
        self.rescale = cfg.fnd.rescale

    # --- the temperature ----------------------------------------------------------------
    def init_temperature(self, model: torch.nn.Module) -> None:  # noqa: B027 (optional hook)
        """Set ``model.logit_scale`` as the method starts it (default: the model's own)."""

    @property
    def temperature_lr(self) -> float | None:
        """The learning rate of the temperature's own group (``own_temperature_group``)."""
        return None

    @property
    def temperature_schedule(self) -> str:
        """How the temperature group's learning rate is scheduled: ``model`` | ``fastclip``."""
        return "model"

    def max_logit_scale(self) -> float:
        """``logit_scale`` is kept in ``[0, max_logit_scale()]`` after every optimiser step."""
        return math.log(100.0)  # open_clip's clamp

    def clamp_temperature(self, logit_scale: torch.nn.Parameter) -> None:
        with torch.no_grad():
            logit_scale.clamp_(0.0, self.max_logit_scale())

    # --- the loss -------------------------------------------------------------------------
    @abstractmethod
    def loss(
        self,
        rows: dict[str, AnchorRows],
        index: torch.Tensor,
        logit_scale: torch.Tensor,
        epoch: int,
    ) -> MethodOutput:
        """The loss of this rank's anchors (its mean over ranks is the global batch's loss).

        Args:
            rows: one ``AnchorRows`` per anchor type; index: ``[b]`` this rank's dataset
            indices; logit_scale: ``1/tau`` as the model outputs it; epoch: for schedules.
        """
