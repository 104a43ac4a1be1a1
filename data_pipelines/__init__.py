"""Data in and out: writing WebDataset shards with dense dataset indices, streaming them back.

Nothing here imports model code: the loader takes the image transform and the tokenizer
as plain callables.
"""

from .shards import DataError, RawSample, ShardSet, ShardWriter, load_shard_set

__all__ = ["DataError", "RawSample", "ShardSet", "ShardWriter", "load_shard_set"]
