"""Batches of cached samples: which samples can share one forward (same latent shapes) and in what groups.

A micro-step's samples are split into groups whose target and every reference share latent shapes; each group
goes through the family's denoiser as one batch (a batch of one included).

A ref_gt's shape is not part of the key: only the LBM sub stream with --sub_stream_target ref_gt uses it, and
only for the draws that take that stream, so keying on it would split batches that never need it. Those draws'
latents have ref_gt's shape; ``objectives.bridge_matching_losses`` gives each latent shape its own forward."""

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
