"""Per-sample state tables, replicated across ranks and checkpointed."""

from .tables import StateTables, TableIndexError

__all__ = ["TableIndexError", "StateTables"]
