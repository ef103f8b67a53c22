"""Batches of cached samples: the data order (which cache entry each global sample position trains on) and which
samples can share one forward (same latent shapes).

The data order is a function of (seed, position) alone, so a resume, or another process count, sees the same
samples at the same positions. An epoch of the order is built in three steps:
1. each source's slots: source k gives ``per_epoch[k]`` slots, its samples in a fresh seeded permutation every
   time it has gone through them all (one source with per_epoch = its size: today's per-epoch permutation);
2. with several sources, the slots of all sources shuffled together (seeded by the epoch);
3. with ``batch`` > 1 and buckets, regrouped so that every run of ``batch`` positions (a micro-batch) comes from one
   bucket: a bucket's batch is emitted when it fills, in the order the epoch reaches it; a bucket's last, partial
   batch is filled with that bucket's first samples of the epoch, so every micro-batch is full.
A micro-step's samples are then split into groups whose target and every reference share latent shapes (one group
under bucket batches); each group goes through the family's denoiser as one batch (a batch of one included).

A ref_gt's shape is not part of the key: only the LBM sub stream with --sub_stream_target ref_gt uses it, and
only for the draws that take that stream, so keying on it would split batches that never need it. Those draws'
latents have ref_gt's shape; ``objectives.bridge_matching_losses`` gives each latent shape its own forward."""

from __future__ import annotations

import json
from bisect import bisect_right
from functools import lru_cache

import torch


@lru_cache(maxsize=8)
def _epoch_order(dataset_size: int, seed: int, epoch: int) -> tuple[int, ...]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return tuple(torch.randperm(dataset_size, generator=generator).tolist())


def sample_at(position: int, dataset_size: int, seed: int) -> int:
    """Cache index for global sample position ``position``: a fresh seeded permutation every epoch."""
    epoch, offset = divmod(position, dataset_size)
    return _epoch_order(dataset_size, seed, epoch)[offset]


def _source_seed(seed: int, source: int) -> int:
    """The first source keeps the run's seed (one source: the order of a plain cache); the others their own."""
    return seed if source == 0 else (seed * 7_919 + source * 104_729) % 2**32


def bucket_batches(indices: list[int], buckets: list, batch: int) -> list[int]:
    """``indices`` reordered into runs of ``batch`` from one bucket each (``buckets[i]``: index i's bucket)."""
    open_batches: dict = {}
    firsts: dict = {}
    done: list[list[int]] = []
    for index in indices:
        key = buckets[index]
        firsts.setdefault(key, []).append(index)
        group = open_batches.setdefault(key, [])
        group.append(index)
        if len(group) == batch:
            done.append(group)
            open_batches[key] = []
    for key, group in open_batches.items():   # dicts keep insertion order: buckets in the order first reached
        if group:
            members = firsts[key]
            done.append(group + [members[i % len(members)] for i in range(batch - len(group))])
    return [index for group in done for index in group]


class DataOrder:
    """The cache index of every global sample position (module docstring). ``sizes``: samples per source (their
    global indices follow each other); ``per_epoch``: slots per source per epoch; ``buckets``: each global index's
    bucket (None: no bucket batches)."""

    def __init__(self, sizes: list[int], per_epoch: list[int] | None, seed: int, batch: int = 1,
                 buckets: list | None = None):
        self.sizes, self.seed, self.batch = list(sizes), seed, batch
        self.per_epoch = list(per_epoch) if per_epoch is not None else list(sizes)
        self.offsets = [sum(self.sizes[:k]) for k in range(len(self.sizes))]
        self.buckets = buckets if batch > 1 else None
        self._starts = [0]          # first position of each epoch built so far (epoch lengths can differ)
        self._epochs: dict[int, list[int]] = {}

    def _mix(self, epoch: int) -> list[int]:
        slots = []
        for k, (offset, size, count) in enumerate(zip(self.offsets, self.sizes, self.per_epoch)):
            seed = _source_seed(self.seed, k)
            slots += [offset + sample_at(epoch * count + j, size, seed) for j in range(count)]
        if len(self.sizes) > 1:
            generator = torch.Generator().manual_seed((self.seed * 2_147_483_647 + epoch * 92_821 + 17) % 2**63)
            slots = [slots[i] for i in torch.randperm(len(slots), generator=generator).tolist()]
        return slots

    def epoch(self, epoch: int) -> list[int]:
        if epoch not in self._epochs:
            order = self._mix(epoch)
            if self.buckets is not None:
                order = bucket_batches(order, self.buckets, self.batch)
            if len(self._epochs) >= 4:
                self._epochs.pop(min(self._epochs))
            self._epochs[epoch] = order
        return self._epochs[epoch]

    def index(self, position: int) -> int:
        if len(self.sizes) == 1 and self.per_epoch == self.sizes and self.buckets is None:
            return sample_at(position, self.sizes[0], self.seed)   # a plain cache: the order it always had
        while self._starts[-1] <= position:
            self._starts.append(self._starts[-1] + len(self.epoch(len(self._starts) - 1)))
        epoch = bisect_right(self._starts, position) - 1
        return self.epoch(epoch)[position - self._starts[epoch]]


def record_bucket(record: dict) -> str:
    """A cached sample's bucket, from its manifest record: the latent shapes of its target and references (what
    ``shape_key`` reads from the tensors)."""
    shapes = record["shapes"]
    refs, k = [], 0
    while f"ref.{k}" in shapes:
        refs.append(shapes[f"ref.{k}"])
        k += 1
    return json.dumps([shapes["target"], refs])


def shape_key(sample: dict) -> tuple:
    """Samples with equal keys can share one batched forward: target and reference latent shapes."""
    refs = []
    while f"ref.{len(refs)}" in sample:
        refs.append(tuple(sample[f"ref.{len(refs)}"].shape))
    return (tuple(sample["target"].shape), tuple(refs))


def shape_groups(samples: list[dict]) -> list[list[int]]:
    """Indices of ``samples`` grouped by shape_key, groups in order of first appearance, order kept inside."""
    groups: dict[tuple, list[int]] = {}
    for i, sample in enumerate(samples):
        groups.setdefault(shape_key(sample), []).append(i)
    return list(groups.values())
