"""Batches of cached samples: which samples can share one forward (same latent shapes) and in what groups.

A micro-step's samples are split into groups whose target and every reference share latent shapes; each group
goes through the family's denoiser as one batch (a batch of one included)."""

from __future__ import annotations


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
