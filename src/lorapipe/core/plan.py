"""The train plan: how micro-batches tile the data stream, and the seeded image order.

Randomness is a pure function of (train.seed, position): the data order of epoch e comes
from seed and e, so a resumed run draws exactly what an uninterrupted one would.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass

import torch

from lorapipe.core.seeds import seeded_generator


@dataclass(frozen=True)
class Plan:
    """How micro-batches tile the data stream; every count derived once, here.

    batch_size is the global micro-batch: train.batch_size per process x processes.
    buckets: the training positions of each image size, when there are several
    (preprocess.buckets); every micro-batch then comes from one of them."""

    images: int
    batch_size: int
    grad_accum: int
    max_steps: int
    buckets: tuple[tuple[int, ...], ...] = ()

    @classmethod
    def from_params(cls, p, images: int, processes: int = 1,
                    buckets: list[list[int]] | None = None) -> Plan:
        groups = tuple(tuple(g) for g in buckets or []) if buckets and len(buckets) > 1 else ()
        plan = cls(images, p.batch_size * processes, p.grad_accum, 0, groups)
        steps = p.max_steps or math.ceil(p.epochs * plan.batches_per_epoch / p.grad_accum)
        return dataclasses.replace(plan, max_steps=steps)

    @property
    def batches_per_epoch(self) -> float:
        """Micro-batches per pass over the data: bucketed, each bucket's last batch is
        filled up from the same bucket; otherwise batches run across epoch ends."""
        if self.buckets:
            return sum(math.ceil(len(g) / self.batch_size) for g in self.buckets)
        return self.images / self.batch_size

    @property
    def steps_per_epoch(self) -> int:
        return max(1, math.ceil(self.batches_per_epoch / self.grad_accum))

    def epoch_of(self, step: int) -> int:
        """The epoch the last image of optimizer step `step` (0-based) belongs to."""
        if self.buckets:
            return ((step + 1) * self.grad_accum - 1) // int(self.batches_per_epoch)
        last = (step + 1) * self.batch_size * self.grad_accum - 1
        return last // self.images

    def batch_indices(self, micro: int, seed: int) -> torch.Tensor:
        """Training positions of micro-batch `micro`: epochs are seeded permutations, batches
        run across epoch ends so every batch is full; bucketed, an epoch is every bucket's
        seeded batches in a seeded order."""
        if self.buckets:
            per_epoch = int(self.batches_per_epoch)
            epoch = _bucket_epoch(seed, micro // per_epoch, self.buckets, self.batch_size)
            return torch.tensor(epoch[micro % per_epoch])
        positions = range(micro * self.batch_size, (micro + 1) * self.batch_size)
        return torch.tensor([_epoch_order(seed, pos // self.images, self.images)[pos % self.images]
                             for pos in positions])


@functools.lru_cache(maxsize=4)
def _epoch_order(seed: int, epoch: int, images: int) -> tuple[int, ...]:
    """The seeded image order of one epoch, drawn once per epoch instead of once per image."""
    return tuple(torch.randperm(images, generator=seeded_generator(seed, "epoch", epoch)).tolist())


@functools.lru_cache(maxsize=4)
def _bucket_epoch(seed: int, epoch: int, buckets: tuple[tuple[int, ...], ...],
                  batch: int) -> tuple[tuple[int, ...], ...]:
    """One epoch's single-bucket batches: each bucket shuffled and cut into full batches
    (the last one filled up from the start of the same shuffled bucket), then all batches
    in a shuffled order. A pure function of (seed, epoch), as the unbucketed order is."""
    gen = seeded_generator(seed, "bucket", epoch)
    batches = []
    for members in buckets:
        order = [members[i] for i in torch.randperm(len(members), generator=gen).tolist()]
        count = math.ceil(len(order) / batch)
        cycled = [order[i % len(order)] for i in range(count * batch)]
        batches += [tuple(cycled[k * batch:(k + 1) * batch]) for k in range(count)]
    return tuple(batches[i] for i in torch.randperm(len(batches), generator=gen).tolist())
