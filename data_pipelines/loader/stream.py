"""``ShardStream``: the plan of every epoch for one rank (which shards it reads, how many
steps every rank can fill) and the door to an epoch's batches (``epoch``)."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
import torch
from PIL import Image

from ..remote import DEFAULT_RETRIES
from ..shards import DataError, ShardInfo, ShardSet
from .batcher import EpochIterator
from .state import LoaderState, mix_seed

log = logging.getLogger("data_pipelines.loader")

ON_ERROR = ("skip", "raise")


class ShardStream:
    """Batches from a ShardSet for one rank, epoch after epoch.

    Args:
        shard_set: the split to read (``load_shard_set``).
        global_batch_size: samples per step over all ranks (``B``); must divide by ``world``.
        rank, world: this process's place in the group (1 process: 0, 1).
        image_transform: PIL image -> tensor (e.g. open_clip's preprocess).
        tokenize: list of captions -> LongTensor ``[n, context_length]``; None for image-only
            training (captions are ignored, samples without one are fine, batches have no
            ``text``).
        num_workers: DataLoader worker processes per rank (0: decode in this process).
        seed: shard order, sample shuffle and augmentation all derive from it and the epoch.
        shuffle_buffer: samples held for shuffling in each worker (<= 1: no shuffling).
        chunk_size: raw samples per worker chunk (a unit of transfer to the main process).
        prefetch_factor: chunks each worker keeps ready (default: two batches over all
            workers, at least two chunks each).
        on_error: ``skip`` bad samples (counted per shard) or ``raise`` at the first one.
        resampled: draw shards with replacement (an endless stream) instead of splitting them.
        samples_per_epoch: with ``resampled``, the length of an epoch (default: the dataset size).
    """

    def __init__(
        self,
        shard_set: ShardSet,
        *,
        global_batch_size: int,
        rank: int = 0,
        world: int = 1,
        image_transform: Callable[[Image.Image], torch.Tensor],
        tokenize: Callable[[list[str]], torch.Tensor] | None,
        num_workers: int = 2,
        seed: int = 0,
        shuffle_buffer: int = 1000,
        chunk_size: int = 32,
        on_error: str = "skip",
        resampled: bool = False,
        samples_per_epoch: int | None = None,
        prefetch_factor: int | None = None,
        retries: int = DEFAULT_RETRIES,
    ):
        if on_error not in ON_ERROR:
            raise ValueError(f"on_error must be one of {ON_ERROR}, got {on_error!r}")
        if global_batch_size % world:
            raise ValueError(f"batch size {global_batch_size} does not divide by {world} processes")
        if not 0 <= rank < world:
            raise ValueError(f"rank {rank} outside [0, {world})")
        self.shard_set = shard_set
        self.global_batch_size = global_batch_size
        self.local_batch_size = global_batch_size // world
        self.rank, self.world = rank, world
        self.image_transform = image_transform
        self.tokenize = tokenize
        self.seed = seed
        self.shuffle_buffer = shuffle_buffer
        self.chunk_size = max(1, chunk_size)
        self.on_error = on_error
        self.resampled = resampled
        self.samples_per_epoch = samples_per_epoch or shard_set.num_samples
        self.retries = retries  # of a remote shard's read (data_pipelines.remote)
        self.num_samples = shard_set.num_samples
        n = shard_set.num_shards
        if resampled and self.samples_per_epoch > shard_set.num_samples:
            # every rank drops repeats of a dataset index within an epoch (one row of state
            # per sample), so it could never fill a longer epoch
            raise DataError(
                f"data.samples_per_epoch={self.samples_per_epoch} is more than the "
                f"{shard_set.num_samples} samples of {shard_set.root}: an epoch sees each "
                "sample at most once; lower it"
            )
        weighted = any(sh.weight != 1.0 for sh in shard_set.shards)
        if resampled and weighted and self.samples_per_epoch > shard_set.num_samples // 2:
            log.warning(
                "data.samples_per_epoch=%d is more than half of the %d samples: an epoch sees "
                "each sample at most once, so the upsampling factors change little more than "
                "the order; lower it for the factors to shape what an epoch holds",
                self.samples_per_epoch,
                shard_set.num_samples,
            )
        if shard_set.in_place and shard_set.images_only and tokenize is not None:
            log.warning(
                "%s was indexed with --images-only: samples without a caption have a dataset "
                "index and are skipped as bad samples in image-text training",
                shard_set.root,
            )
        if not resampled and weighted:
            raise DataError(
                f"{shard_set.root}: the manifest gives upsampling factors, which only "
                "data.resampled=true uses (shards drawn by weight, as open_clip does); set it, "
                "or index without --upsampling-factors"
            )
        if not resampled and n < world:
            raise DataError(
                f"{shard_set.root} has {n} shard(s) but {world} processes read it: every process "
                f"needs at least one shard. Write more, smaller shards (clipfnd data ... "
                f"--shard-size {max(1, shard_set.num_samples // (world * max(num_workers, 1)))})"
            )
        per_rank = n if resampled else n // world
        if num_workers > per_rank:
            log.warning(
                "%d shard(s) per process cannot feed %d workers each; using %d workers",
                per_rank,
                num_workers,
                per_rank,
            )
            num_workers = per_rank
        self.num_workers = num_workers
        # chunks each worker keeps ready: by default two batches over all workers (at least
        # two chunks each), so that a step that ends early does not wait for the next batch
        self.prefetch_factor = prefetch_factor or max(
            2, math.ceil(2 * self.local_batch_size / (self.chunk_size * max(num_workers, 1)))
        )
        if self.steps_per_epoch(0) < 1:
            raise DataError(
                f"{shard_set.root}: {shard_set.num_samples} samples cannot fill one batch of "
                f"{global_batch_size} per step on every process; lower data.batch_size"
            )

    def shards_for(self, epoch: int, rank: int) -> list[ShardInfo]:
        """The shards rank ``rank`` reads in ``epoch`` (same answer on every rank)."""
        order = np.random.default_rng(mix_seed(self.seed, epoch, 0)).permutation(
            self.shard_set.num_shards
        )
        shards = [self.shard_set.shards[i] for i in order]
        return shards[rank :: self.world]

    def steps_per_epoch(self, epoch: int) -> int:
        if self.resampled:
            return self.samples_per_epoch // self.global_batch_size
        counts = [sum(s.num_samples for s in self.shards_for(epoch, r)) for r in range(self.world)]
        return min(counts) // self.local_batch_size

    def dropped_in_epoch(self, epoch: int) -> int:
        """Samples past the last full step of every rank (not seen in this epoch)."""
        if self.resampled:
            return 0
        return self.num_samples - self.steps_per_epoch(epoch) * self.global_batch_size

    def epoch(self, epoch: int, state: LoaderState | None = None) -> EpochIterator:
        return EpochIterator(self, epoch, self.rank, state)
