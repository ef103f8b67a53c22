"""Batch > 1 for phase 2: several same-shape samples through the DiT in one forward.

The engine's ``model_fn_qwen_image`` handles one sample only: it counts a batch of references as frames of one
image (their RoPE grid), and its last rearrange hard-codes B=1. ``batched_model_fn`` is the same computation for
a batch, built from the engine's own modules (``img_in``, ``time_text_embed``, ``txt_norm``/``txt_in``,
``pos_embed``, the transformer blocks through the engine's gradient checkpointing, ``norm_out``, ``proj_out``),
with the engine's zero_cond_t handling (reference tokens modulated at timestep 0) and the same reference-token
layout. Prompts of different lengths are padded at the end and the padded text keys masked out of the joint
attention, so every sample sees exactly what it sees alone (tests/test_batching.py checks it against B separate
engine calls).

Samples batch together when their target and every reference share latent shapes (``shape_key``); the trainer
splits a micro-step's samples into such groups (``shape_groups``).
"""

from __future__ import annotations

from math import prod

import torch
from diffsynth.core import gradient_checkpoint_forward
from einops import rearrange

from .errors import EditTunerError


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


def collate_conditioning(samples: list[dict], device, dtype, zero_cond_t: bool, gradient_checkpointing: bool = False,
                         latent_hw: tuple[int, int] | None = None) -> dict:
    """The DiT's inputs, except latents and timestep, for same-shape samples (a batch of one included: then it is
    exactly the engine's batch-1 input). At inference there is no target: ``latent_hw`` gives the output size."""
    keys = {shape_key(s) for s in samples} if len(samples) > 1 else set()
    if len(keys) > 1:
        raise EditTunerError(f"a batch needs one latent shape (target and references); got {sorted(keys)}")
    refs = []
    while f"ref.{len(refs)}" in samples[0]:
        k = len(refs)
        refs.append(torch.stack([s[f"ref.{k}"] for s in samples]).to(device=device, dtype=dtype))
    lengths = [s["prompt_emb"].shape[0] for s in samples]
    longest = max(lengths)
    prompt_emb = torch.zeros(len(samples), longest, samples[0]["prompt_emb"].shape[-1], dtype=dtype, device=device)
    mask = torch.zeros(len(samples), longest, dtype=torch.long, device=device)
    for i, (s, n) in enumerate(zip(samples, lengths)):
        prompt_emb[i, :n] = s["prompt_emb"].to(device=device, dtype=dtype)
        mask[i, :n] = 1
    height, width = (d * 8 for d in (latent_hw or samples[0]["target"].shape[-2:]))
    return {"prompt_emb": prompt_emb, "prompt_emb_mask": mask, "edit_latents": refs, "height": height,
            "width": width, "zero_cond_t": zero_cond_t, "use_gradient_checkpointing": gradient_checkpointing}


def select_rows(conditioning: dict, rows: list[int]) -> dict:
    """The collated conditioning of some of its samples, with the prompt padding trimmed to their longest prompt
    (one sample: no padding at all, so the engine's batch-1 model function sees exactly its own prompt)."""
    mask = conditioning["prompt_emb_mask"][rows]
    longest = int(mask.sum(dim=1).max())
    edits = conditioning.get("edit_latents")
    return {**conditioning, "prompt_emb": conditioning["prompt_emb"][rows, :longest], "prompt_emb_mask": mask[:, :longest],
            "edit_latents": None if edits is None else [e[rows] for e in edits]}


def batched_model_fn(dit, latents: torch.Tensor, timestep: torch.Tensor, prompt_emb: torch.Tensor,
                     prompt_emb_mask: torch.Tensor, height: int, width: int, edit_latents=None,
                     zero_cond_t: bool = False, use_gradient_checkpointing: bool = False,
                     use_gradient_checkpointing_offload: bool = False, enable_fp8_attention: bool = False,
                     **unsupported) -> torch.Tensor:
    """model_fn_qwen_image for latents (B, C, h, w), one timestep per sample (B,), prompt embeddings (B, L, D)
    padded at the end with prompt_emb_mask (B, L), and each reference as (B, C, h_k, w_k)."""
    extra = sorted(k for k, v in unsupported.items() if v is not None and v is not False)
    if extra:
        raise EditTunerError(f"batched DiT forward: {', '.join(extra)} not supported (batch size 1 only)")
    batch = latents.shape[0]
    timestep = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep.reshape(batch)
    edits = [] if edit_latents is None else (edit_latents if isinstance(edit_latents, list) else [edit_latents])
    for e in edits:
        if e.shape[0] != batch:
            raise EditTunerError(f"batched DiT forward: a reference has batch {e.shape[0]}, the latents {batch}")
    img_shapes = [(1, latents.shape[2] // 2, latents.shape[3] // 2)]
    img_shapes += [(1, e.shape[2] // 2, e.shape[3] // 2) for e in edits]
    lengths = prompt_emb_mask.sum(dim=1)
    txt_seq_lens = lengths.tolist()
    if prompt_emb.shape[1] != max(txt_seq_lens):
        raise EditTunerError("batched DiT forward: pad prompt embeddings to the longest prompt exactly")
    timestep = timestep / 1000

    image = rearrange(latents, "B C (H P) (W Q) -> B (H W) (C P Q)", H=height // 16, W=width // 16, P=2, Q=2)
    image_seq_len = image.shape[1]
    image = torch.cat([image] + [rearrange(e, "B C (H P) (W Q) -> B (H W) (C P Q)", P=2, Q=2) for e in edits], dim=1)
    image = dit.img_in(image)
    if zero_cond_t:
        timestep = torch.cat([timestep, timestep * 0], dim=0)
        modulate_index = torch.tensor([[0] * prod(img_shapes[0]) + [1] * sum(prod(s) for s in img_shapes[1:])],
                                      device=timestep.device, dtype=torch.int)
    else:
        modulate_index = None
    conditioning = dit.time_text_embed(
        timestep, image.dtype,
        addition_t_cond=None if not dit.time_text_embed.use_additional_t_cond
        else torch.tensor([0]).to(device=image.device, dtype=torch.long))
    text = dit.txt_in(dit.txt_norm(prompt_emb))
    image_rotary_emb = dit.pos_embed(img_shapes, txt_seq_lens, device=latents.device)
    attention_mask = None
    if bool((lengths < prompt_emb.shape[1]).any()):
        # Joint attention runs over [text, image]: hide the padded text keys (additive mask, every query row
        # keeps its image keys, so nothing is all -inf).
        keep = torch.cat([prompt_emb_mask.bool(),
                          torch.ones(batch, image.shape[1], dtype=torch.bool, device=image.device)], dim=1)
        attention_mask = torch.zeros(keep.shape, dtype=image.dtype, device=image.device)
        attention_mask = attention_mask.masked_fill(~keep, float("-inf"))[:, None, None, :]

    for block in dit.transformer_blocks:
        text, image = gradient_checkpoint_forward(
            block, use_gradient_checkpointing, use_gradient_checkpointing_offload,
            image=image, text=text, temb=conditioning, image_rotary_emb=image_rotary_emb,
            attention_mask=attention_mask, enable_fp8_attention=enable_fp8_attention,
            modulate_index=modulate_index, kv_cache=None)
    if zero_cond_t:
        conditioning = conditioning.chunk(2, dim=0)[0]
    image = dit.proj_out(dit.norm_out(image, conditioning))[:, :image_seq_len]
    return rearrange(image, "B (H W) (C P Q) -> B C (H P) (W Q)", H=height // 16, W=width // 16, P=2, Q=2)
