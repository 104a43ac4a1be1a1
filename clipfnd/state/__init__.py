"""Per-sample state tables, replicated across ranks or sharded over them, and checkpointed
(``files``: their files, and the detector's state, in a checkpoint folder)."""

from .files import (
    DETECTOR_FILE,
    TABLES_FILE,
    load_detector_state,
    load_tables,
    read_full_tables,
    save_detector_state,
    save_tables,
    shard_file,
    table_sources,
)
from .tables import ShardedTables, StateTables, TableIndexError

__all__ = [
    "DETECTOR_FILE",
    "TABLES_FILE",
    "ShardedTables",
    "StateTables",
    "TableIndexError",
    "load_detector_state",
    "load_tables",
    "read_full_tables",
    "save_detector_state",
    "save_tables",
    "shard_file",
    "table_sources",
]
