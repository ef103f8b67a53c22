"""Training objectives. Flow matching follows the engine's FlowMatchSFTLoss step for step (tests check parity).

Convention (the engine's, for Qwen-Image): sigma in [0, 1] with sigma = timestep / 1000;
x_sigma = (1 - sigma) * x0 + sigma * noise; the DiT predicts the velocity noise - x0; each sample's loss is
weighted by the scheduler's training weight at its timestep.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from diffsynth.diffusion.flow_match import FlowMatchScheduler
from diffsynth.pipelines.qwen_image import model_fn_qwen_image

from .errors import EditTunerError


def training_scheduler() -> FlowMatchScheduler:
    """The engine's Qwen-Image training schedule: 1000 shifted timesteps with their loss weights."""
    scheduler = FlowMatchScheduler("Qwen-Image")
    scheduler.set_timesteps(1000, training=True)
    return scheduler


@dataclass(frozen=True)
class FlowMatchConfig:
    min_timestep_boundary: float = 0.0
    max_timestep_boundary: float = 1.0
    # Mask weighting: per-latent-pixel weight masked_weight inside the edit mask, unmasked_weight outside,
    # normalised by the mean weight so the loss scale does not depend on the mask's area. 1/1 = plain MSE.
    masked_weight: float = 1.0
    unmasked_weight: float = 1.0

    def __post_init__(self):
        if not 0.0 <= self.min_timestep_boundary < self.max_timestep_boundary <= 1.0:
            raise EditTunerError("--min_timestep_boundary / --max_timestep_boundary: need 0 <= min < max <= 1")
        if self.masked_weight < 0 or self.unmasked_weight < 0 or self.masked_weight + self.unmasked_weight == 0:
            raise EditTunerError("--masked_loss_weight / --unmasked_loss_weight: must be >= 0 and not both 0")

    @property
    def uses_mask(self) -> bool:
        return self.masked_weight != self.unmasked_weight


def dit_conditioning(sample: dict[str, torch.Tensor], device, dtype, zero_cond_t: bool,
                     gradient_checkpointing: bool = False) -> dict:
    """model_fn_qwen_image's inputs, except latents and timestep, from one cached sample."""
    refs = []
    while f"ref.{len(refs)}" in sample:
        refs.append(sample[f"ref.{len(refs)}"][None].to(device=device, dtype=dtype))
    prompt_emb = sample["prompt_emb"][None].to(device=device, dtype=dtype)
    height, width = (d * 8 for d in sample["target"].shape[-2:])
    return {"prompt_emb": prompt_emb,
            "prompt_emb_mask": torch.ones(prompt_emb.shape[:2], dtype=torch.long, device=device),
            "edit_latents": refs, "height": height, "width": width, "zero_cond_t": zero_cond_t,
            "use_gradient_checkpointing": gradient_checkpointing}


class DiTDenoiser(torch.nn.Module):
    """The DiT behind the engine's model function, as one module so DDP/DeepSpeed see a normal forward."""

    def __init__(self, dit: torch.nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, latents, timestep, **conditioning):
        return model_fn_qwen_image(dit=self.dit, latents=latents, timestep=timestep, **conditioning)


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                 cfg: FlowMatchConfig) -> torch.Tensor:
    squared = (prediction.float() - target.float()) ** 2
    if mask is None or not cfg.uses_mask:
        return squared.mean()
    weight = cfg.unmasked_weight + (cfg.masked_weight - cfg.unmasked_weight) * mask.float().to(squared.device)
    weight = weight.expand_as(squared)
    return (squared * weight).mean() / weight.mean().clamp_min(1e-8)


def flow_matching_loss(denoiser: Callable, scheduler: FlowMatchScheduler, x0: torch.Tensor, conditioning: dict,
                       cfg: FlowMatchConfig = FlowMatchConfig(), mask: torch.Tensor | None = None) -> torch.Tensor:
    """One sample's loss, drawing from the global RNG in the same order as the engine's FlowMatchSFTLoss."""
    steps = len(scheduler.timesteps)
    timestep_id = torch.randint(int(cfg.min_timestep_boundary * steps), int(cfg.max_timestep_boundary * steps), (1,))
    timestep = scheduler.timesteps[timestep_id].to(dtype=x0.dtype, device=x0.device)
    noise = torch.randn_like(x0)
    latents = scheduler.add_noise(x0, noise, timestep)
    target = scheduler.training_target(x0, noise, timestep)
    prediction = denoiser(latents=latents, timestep=timestep, **conditioning)
    loss = weighted_mse(prediction, target, mask, cfg)
    return loss * scheduler.training_weight(timestep)


@torch.no_grad()
def fixed_noise_loss(denoiser: Callable, scheduler: FlowMatchScheduler, samples: list[dict], device, dtype,
                     zero_cond_t: bool, cfg: FlowMatchConfig = FlowMatchConfig(), draws: int = 4,
                     seed: int = 1234) -> float:
    """Mean loss over ``samples`` with fixed timesteps and noise: comparable across steps, unlike the training loss."""
    total = 0.0
    with torch.random.fork_rng(devices=[torch.device(device)] if torch.device(device).type == "cuda" else []):
        for i, sample in enumerate(samples):
            x0 = sample["target"][None].to(device, dtype)
            conditioning = dit_conditioning(sample, device, dtype, zero_cond_t)
            mask = sample["mask"][None].to(device) if "mask" in sample else None
            for d in range(draws):
                torch.manual_seed(seed + i * draws + d)
                total += float(flow_matching_loss(denoiser, scheduler, x0, conditioning, cfg, mask))
    return total / (len(samples) * draws)
