"""The Qwen-Image DiT as a denoiser: batches (one sample included) through the engine's model function.

The engine's ``model_fn_qwen_image`` handles one sample only: it counts a batch of references as frames of one
image (their RoPE grid), and its last rearrange hard-codes B=1. ``batched_model_fn`` is the same computation for
a batch, built from the engine's own modules (``img_in``, ``time_text_embed``, ``txt_norm``/``txt_in``,
``pos_embed``, the transformer blocks through the engine's gradient checkpointing, ``norm_out``, ``proj_out``),
with the engine's zero_cond_t handling (reference tokens modulated at timestep 0) and the same reference-token
layout. Prompts of different lengths are padded at the end and the padded text keys masked out of the joint
attention, so every sample sees exactly what it sees alone (tests/test_batching.py checks it against B separate
engine calls).

Samples batch together when their target and every reference share latent shapes (``batching.shape_key``).
This module also holds the rest of the family's denoising: ``DiTDenoiser`` (the DiT as one module for DDP and
DeepSpeed), the engine's training schedule and its flow sampler.
"""

from __future__ import annotations

from math import prod

import torch
from diffsynth.core import gradient_checkpoint_forward
from diffsynth.diffusion.flow_match import FlowMatchScheduler
from diffsynth.pipelines.qwen_image import model_fn_qwen_image
from einops import rearrange

from ...batching import shape_key
from ...errors import EditTunerError


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


class DiTDenoiser(torch.nn.Module):
    """The DiT behind the engine's model function, as one module so DDP/DeepSpeed see a normal forward."""

    def __init__(self, dit: torch.nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, latents, timestep, **conditioning):
        if latents.shape[0] > 1:  # the engine's model function is batch-1 only: our batched twin of it
            return batched_model_fn(self.dit, latents=latents, timestep=timestep, **conditioning)
        return model_fn_qwen_image(dit=self.dit, latents=latents, timestep=timestep, **conditioning)


def training_scheduler() -> FlowMatchScheduler:
    """The engine's Qwen-Image training schedule: 1000 shifted timesteps with their loss weights."""
    scheduler = FlowMatchScheduler("Qwen-Image")
    scheduler.set_timesteps(1000, training=True)
    return scheduler


@torch.no_grad()
def sample_flow(denoiser, conditioning: dict, negative_conditioning: dict | None, latent_shape, steps: int,
                guidance: float, generator: torch.Generator, keep: tuple[torch.Tensor, torch.Tensor] | None = None,
                device=None, dtype=torch.float32) -> torch.Tensor:
    """The engine's flow-matching sampler from noise; ``keep = (mask, known)`` holds latents outside the mask on
    the path to ``known`` with the engine's inpainting rule."""
    scheduler = FlowMatchScheduler("Qwen-Image")
    height, width = latent_shape[-2:]
    if steps == 1:
        # The engine's schedule stretches its end by 1 / (1 - last sigma): 0/0 = NaN for one step (a black image).
        # Its limit is the start, sigma 1: one Euler step from the noise to sigma 0.
        scheduler.set_timesteps(1, sigmas=[1.0])
    else:
        scheduler.set_timesteps(steps, dynamic_shift_len=(height // 2) * (width // 2))
    latents = torch.randn(latent_shape, generator=generator, dtype=torch.float32).to(device=device, dtype=dtype)
    for t in scheduler.timesteps:
        timestep = t.reshape(1).to(device=device, dtype=dtype)
        velocity = denoiser(latents=latents, timestep=timestep, **conditioning)
        if negative_conditioning is not None:
            negative = denoiser(latents=latents, timestep=timestep, **negative_conditioning)
            velocity = negative + guidance * (velocity - negative)
        if keep is not None:
            mask, known = keep
            back_to_known = scheduler.return_to_timestep(t, latents, known)
            velocity = back_to_known * (1 - mask) + velocity * mask
        latents = scheduler.step(velocity, t, latents)
    return latents
