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

    Shape: anchors ``[n, d]`` (this rank's, with gradient); others ``[M, d]`` (the gathered
    candidates, with gradient); pos ``[n]`` the positive's column; fn_mask ``[n, M]`` bool,
    flagged false negatives (or None); not_negative ``[n, M]`` bool, columns that are neither
    positive nor negative (or None; unimodal: always marks the anchor's own column).

    Bimodal, ``n = b``. Unimodal (two views), ``n = 2b``: rows are view 1 of the rank's ``b``
    images, then view 2 (``K = n / b`` rows per image); ``self_col`` ``[n]`` is each row's own
    column among the ``M = 2B`` gathered views and ``columns_index`` ``[M]`` the dataset index
    of every column (what a method needs to draw per-anchor randomness the same way on any
    number of processes).
    """

    anchors: torch.Tensor
    others: torch.Tensor
    pos: torch.Tensor
    fn_mask: torch.Tensor | None = None
    not_negative: torch.Tensor | None = None
    self_col: torch.Tensor | None = None
    columns_index: torch.Tensor | None = None


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
    modes: ClassVar[tuple[str, ...]] = ("clip",)  # the training modes it can serve
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
            indices (one per image: unimodal rows hold ``K = 2`` per image); logit_scale:
            ``1/tau`` as the model outputs it; epoch: for schedules.
        """


class ConstantTemperature:
    """A mixin for methods with the constant temperature ``loss.tau``: ``logit_scale`` is set
    to ``ln(1/tau)`` and frozen (no gradient, no optimiser state, never clamped away)."""

    cfg: Config

    def init_temperature(self, model: torch.nn.Module) -> None:
        with torch.no_grad():
            model.logit_scale.fill_(math.log(1.0 / self.cfg.loss.tau))
        model.logit_scale.requires_grad_(False)

    def max_logit_scale(self) -> float:
        return max(math.log(1.0 / self.cfg.loss.tau), math.log(1.0 / self.cfg.loss.tau_min))
