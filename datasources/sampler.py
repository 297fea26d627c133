"""`ResumableDistributedSampler`: the global order is a seeded permutation per epoch, cut into rank
shards; it can start in the middle of an epoch, which is what exact resume needs."""
from __future__ import annotations

from typing import Iterator

import torch
from torch.utils.data import Sampler


class ResumableDistributedSampler(Sampler[int]):
    """Epoch-seeded global permutation, truncated to a multiple of world_size * batch_size, rank r
    taking every world_size-th batch. `set_position(epoch, batch)` restarts mid-epoch."""

    def __init__(self, num_samples: int, batch_size: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True):
        self.n, self.batch_size, self.rank, self.world_size = num_samples, batch_size, rank, world_size
        self.seed, self.shuffle = seed, shuffle
        self.batches_per_epoch = num_samples // (batch_size * world_size)
        if self.batches_per_epoch == 0:
            raise ValueError(f"dataset of {num_samples} images is smaller than one global batch "
                             f"({batch_size} x {world_size} processes); lower --batch-size")
        self.epoch, self.start_batch = 0, 0

    def set_position(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.start_batch = epoch, batch

    def __len__(self) -> int:
        return (self.batches_per_epoch - self.start_batch) * self.batch_size

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
            order = torch.randperm(self.n, generator=g)
        else:
            order = torch.arange(self.n)
        order = order[: self.batches_per_epoch * self.batch_size * self.world_size]
        # [batches, world, batch] -> this rank's batches
        mine = order.view(self.batches_per_epoch, self.world_size, self.batch_size)[:, self.rank]
        return iter(mine[self.start_batch:].reshape(-1).tolist())
