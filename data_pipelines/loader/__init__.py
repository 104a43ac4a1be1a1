"""Streaming shards back as batches: exact, equal on every rank, resumable mid-epoch.

Modules: ``stream`` (``ShardStream``: the epoch plan), ``worker`` (what each loader worker
runs: read, shuffle, decode into chunks), ``batcher`` (``EpochIterator``: chunks into batches,
the resume position), ``state`` (``LoaderState``, ``Chunk``, ``BadSample``), ``context`` (how
workers start).

How an epoch is laid out
------------------------
1. All ranks shuffle the shard list with the same RNG seeded by ``(seed, epoch)``, and rank
   ``r`` of ``world`` takes ``shards[r::world]`` (what ``webdataset.split_by_node`` does, with
   rank and world passed in rather than read from globals).
2. Worker ``w`` of ``W`` on that rank takes ``rank_shards[w::W]`` (what
   ``webdataset.split_by_worker`` does). The split is done here so that a resumed epoch can
   give each worker its original role (see ``LoaderState``).
3. Each worker streams its shards (webdataset's tar reader), shuffles samples in a buffer
   with an RNG seeded by ``(seed, epoch, rank, worker)``, numbers them (raw positions), and
   decodes them in **chunks** of ``chunk_size`` raw positions. A sample that cannot be used
   (unreadable image, empty caption, index out of range) leaves a gap in its chunk and is
   counted, so chunk boundaries never depend on the data's faults.
4. The main process receives chunks round-robin from the workers (PyTorch's in-order
   ``DataLoader``) and cuts them into batches of exactly ``batch_size / world``.
5. Every rank stops after ``steps_per_epoch(epoch)`` batches: the smallest number that every
   rank can fill, computed from the manifest's per-shard counts, so no rank waits for
   another at the end of an epoch. Samples past that point in the larger ranks are dropped
   for this epoch (how many is logged); with equal shards and a sample count divisible by
   the global batch, every sample is seen exactly once per epoch.

Augmentation randomness is seeded per sample from ``(seed, epoch, rank, worker, position)``,
so a batch is the same whatever the number of workers restarted in between.
"""

from __future__ import annotations

from .batcher import EpochIterator
from .context import WORKER_PRELOAD, worker_context
from .state import BadSample, Chunk, LoaderState
from .stream import ON_ERROR, ShardStream

__all__ = [
    "ON_ERROR",
    "WORKER_PRELOAD",
    "BadSample",
    "Chunk",
    "EpochIterator",
    "LoaderState",
    "ShardStream",
    "worker_context",
]
