"""Per-sample state tables, replicated across ranks or sharded over them, and checkpointed."""

from .tables import ShardedTables, StateTables, TableIndexError

__all__ = ["ShardedTables", "StateTables", "TableIndexError"]
