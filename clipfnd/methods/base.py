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


@dataclass(frozen=True)
class TemperaturePolicy:
    """How a method's temperature (``tau = 1 / exp(logit_scale)``, the model's ``logit_scale``)
    starts, learns and is kept. The run's build and the optimiser step consume it; neither
    looks at the method's name."""

    start: float | None = None  # logit_scale at the start (None: as the model has it)
    learned: bool = True  # False: frozen (no gradient, no optimiser state)
    # a learned temperature in a parameter group of its own, at this learning rate (None: in
    # the model's group without weight decay)
    group_lr: float | None = None
    # how that group's learning rate is scheduled (``clipfnd.train.schedule``): ``model`` (the
    # model's schedule) or ``fastclip`` (constant, a third of it while tau <= 0.03)
    lr_rule: str = "model"
    max_logit_scale: float = math.log(100.0)  # kept in [0, this] after every step (open_clip's)

    def apply(self, model: torch.nn.Module) -> None:
        """Set ``model.logit_scale`` as the method starts it, frozen if it is not learned."""
        if self.start is not None:
            with torch.no_grad():
                model.logit_scale.fill_(self.start)
        if not self.learned:
            model.logit_scale.requires_grad_(False)

    def clamp(self, logit_scale: torch.nn.Parameter) -> None:
        with torch.no_grad():
            logit_scale.clamp_(0.0, self.max_logit_scale)


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

    def __init__(self, cfg: Config, tables: StateTables, anchor_types: tuple[str, ...]):
        self.cfg = cfg
        self.tables = tables
        self.anchor_types = anchor_types
        self.removal = cfg.fnd.removal
        self.rescale = cfg.fnd.rescale

    @classmethod
    def from_config(cls, cfg: Config, tables: StateTables, anchor_types: tuple[str, ...]) -> Method:
        """The method as ``cfg`` configures it (its tables added to ``tables``)."""
        return cls(cfg, tables, anchor_types)

    def temperature_policy(self) -> TemperaturePolicy:
        """How the temperature starts, learns and is kept (default: the model's own, learned
        with the model, clamped at ``ln 100`` as open_clip does)."""
        return TemperaturePolicy()

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

    def temperature_policy(self) -> TemperaturePolicy:
        start = math.log(1.0 / self.cfg.loss.tau)
        return TemperaturePolicy(
            start, learned=False, max_logit_scale=max(start, math.log(1.0 / self.cfg.loss.tau_min))
        )
