"""Training samplers whose position is a function of the batches trained so far, so that a resumed run sees
exactly the images and augmentations an uninterrupted run would have seen.

Each training stream (labeled, unlabeled) is an endless concatenation of seeded permutations of its set,
as detectron2's ``TrainingSampler``; under DDP process ``r`` of ``W`` takes every W-th element, starting at
``r``. Every element carries its own augmentation seed (a hash of the run seed, the stream and the
position), so the augmentation of an image no longer depends on which data-loader worker loads it.

Position bookkeeping: every training batch advances every stream by its batch size, whichever loader
Lightning restarts when (``max_size_cycle`` restarts the shorter stream inside an epoch and every stream at
an epoch start). So a stream's next position is always ``batches trained so far x batch size``: the sampler
asks the trainer for that count when a loader is created (fresh or resumed run) and when a new epoch starts,
and continues where it stopped when the shorter stream is restarted inside an epoch.

Written by hand: torch's samplers reshuffle per epoch only and cannot start mid-stream, and
``torchdata``'s ``StatefulDataLoader`` records the position of a worker-side iterator that Lightning's
one-batch prefetch runs ahead of training.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterator

import torch
from torch.utils.data import DistributedSampler


def mix_seed(*parts: int | str) -> int:
    """A stable 63-bit seed from any parts (same value in every process and Python run)."""
    digest = hashlib.blake2b("/".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class StreamSampler(DistributedSampler):
    """Yields ``(index, augmentation seed)`` pairs from an endless seeded stream of permutations.

    Args:
        n: size of the set.
        batch_size: images per batch of this stream (one batch advances the stream by this many).
        seed: the run seed (``seed_everything``).
        name: the stream's name, mixed into its seeds ("labeled", "unlabeled").
        batches_done: returns how many training batches have been completed (the trainer's count).
        num_replicas, rank: the DDP world size and this process's rank.

    ``len(sampler)`` is the per-epoch share, ``floor(ceil(n / W) / B) * B`` (as ``drop_last``), so the epoch
    length Lightning sees is unchanged. It subclasses ``DistributedSampler`` so that Lightning leaves it in
    place under DDP instead of wrapping it.
    """

    def __init__(self, n: int, batch_size: int, seed: int, name: str, batches_done: Callable[[], int],
                 epoch: int = 0, num_replicas: int = 1, rank: int = 0) -> None:
        super().__init__(range(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.n, self.batch_size, self.name, self.batches_done = n, batch_size, name, batches_done
        share = -(-n // num_replicas)
        self.length = (share // batch_size) * batch_size
        self.epoch = epoch
        self.next_start = batches_done() * batch_size  # this process's position in the stream, in samples

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        """A new epoch restarts every loader: continue at the position of the batches trained so far."""
        if epoch != self.epoch:
            self.epoch = epoch
            self.next_start = self.batches_done() * self.batch_size

    def permutation(self, k: int) -> torch.Tensor:
        """The k-th permutation of the stream."""
        g = torch.Generator().manual_seed(mix_seed(self.seed, self.name, "perm", k))
        return torch.randperm(self.n, generator=g)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        start, self.next_start = self.next_start, self.next_start + self.length
        return self._elements(start, start + self.length)

    def _elements(self, start: int, stop: int) -> Iterator[tuple[int, int]]:
        k, perm = None, None
        for position in range(start, stop):
            p = position * self.num_replicas + self.rank
            if p // self.n != k:
                k = p // self.n
                perm = self.permutation(k)
            yield int(perm[p % self.n]), mix_seed(self.seed, self.name, "aug", p) % 2**31
