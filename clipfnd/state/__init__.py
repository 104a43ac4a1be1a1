"""Per-sample state tables, replicated across ranks and checkpointed."""

from .tables import TableIndexError, StateTables

__all__ = ["TableIndexError", "StateTables"]
