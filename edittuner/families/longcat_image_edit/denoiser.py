"""LongCat-Image-Edit's transformer as a denoiser, its training schedule and its flow sampler, on the pipeline's own
helpers (``_pack_latents`` / ``_unpack_latents``, ``prepare_pos_ids``, ``calculate_shift``, ``retrieve_timesteps``)
and diffusers' FlowMatchEulerDiscreteScheduler.

Convention mapping. The pipeline feeds the transformer ``timestep / 1000`` (the scheduler's timesteps are
sigma * 1000) and steps x <- x + (sigma_next - sigma) * output with x_sigma = (1 - sigma) x0 + sigma noise (LongCat's
training target is ``noise - latents``): the output is already the velocity noise - x0 the generic objectives use.
So the denoiser takes the generic timestep (sigma * 1000), divides it by 1000 as the pipeline does, and returns
the transformer's output for the target tokens unchanged, unpacked to (B, C, h, w).

Token layout (the pipeline's): the target's packed latents, then the reference's, as one image sequence; position
ids: text (modality 0, 0..L-1), target (modality 1) and reference (modality 2) grids both offset by L. The
transformer takes no attention mask, so a batch needs prompts of one length; the pipeline pads every prompt to 512
tokens, so only a different reference size (hence vision-token count) changes it, and such samples never share a
batch (batching.shape_key).
"""

from __future__ import annotations

import numpy as np
import torch

from ...batching import shape_key
from ...errors import EditTunerError
from .models import SCHEDULER_CONFIG

# The pipeline samples at about 1024x1024 pixels whatever the input size (__call__ resizes to that area), so its
# shift is calculate_shift at (1024 / 16) ** 2 = 4096 tokens: mu = max_shift = 1.15. LongCat-Image's own edit
# training example samples sigma = sigmoid(N(0, 1)) and applies the same time shift (mu from that resolution).
TRAINING_SEQ_LEN = (1024 // 16) ** 2


def _pipeline():
    from diffusers.pipelines.longcat_image import pipeline_longcat_image_edit
    return pipeline_longcat_image_edit


def _pack(latents: torch.Tensor) -> torch.Tensor:
    b, c, h, w = latents.shape
    return _pipeline().LongCatImageEditPipeline._pack_latents(latents, b, c, h, w)


def _image_ids(modality: int, prompt_length: int, latent_hw, device, dtype) -> torch.Tensor:
    h, w = latent_hw
    return _pipeline().prepare_pos_ids(modality_id=modality, type="image", start=(prompt_length, prompt_length),
                                       height=h // 2, width=w // 2).to(device, dtype=dtype)


def collate_conditioning(samples: list[dict], device, dtype, gradient_checkpointing: bool = False,
                         latent_hw: tuple[int, int] | None = None) -> dict:
    """The transformer's inputs besides latents and timestep for same-shape samples (a batch of one included).
    At inference there is no target: ``latent_hw`` gives the output's latent size."""
    keys = {shape_key(s) for s in samples} if len(samples) > 1 else set()
    if len(keys) > 1:
        raise EditTunerError(f"a batch needs one latent shape (target and reference); got {sorted(keys)}")
    lengths = sorted({s["prompt_emb"].shape[0] for s in samples})
    if len(lengths) > 1:
        raise EditTunerError(f"LongCat-Image-Edit's transformer takes no attention mask, so a batch needs prompt "
                             f"embeddings of one length; got {lengths}: use --batch_size 1")
    length = lengths[0]
    latent_hw = tuple(latent_hw or samples[0]["target"].shape[-2:])
    prompt_emb = torch.stack([s["prompt_emb"] for s in samples]).to(device=device, dtype=dtype)
    txt_ids = _pipeline().prepare_pos_ids(modality_id=0, type="text", start=(0, 0), num_token=length).to(device)
    conditioning = {"prompt_emb": prompt_emb, "txt_ids": txt_ids,
                    "latent_ids": _image_ids(1, length, latent_hw, device, None), "ref_latents": None, "ref_ids": None,
                    "gradient_checkpointing": gradient_checkpointing}
    if "ref.0" in samples[0]:
        ref = torch.stack([s["ref.0"] for s in samples]).to(device=device, dtype=dtype)
        conditioning["ref_latents"] = _pack(ref)
        # float64 as the pipeline makes them (concatenated with the float32 target ids, the ids become float64)
        conditioning["ref_ids"] = _image_ids(2, length, ref.shape[-2:], device, torch.float64)
    return conditioning


def select_rows(conditioning: dict, rows: list[int]) -> dict:
    ref = conditioning["ref_latents"]
    return {**conditioning, "prompt_emb": conditioning["prompt_emb"][rows],
            "ref_latents": None if ref is None else ref[rows]}


def without_references(conditioning: dict) -> dict:
    return {**conditioning, "ref_latents": None, "ref_ids": None}


class LongCatDenoiser(torch.nn.Module):
    """The transformer as one module (DDP/DeepSpeed see a normal forward): the generic denoiser convention."""

    def __init__(self, dit: torch.nn.Module):
        super().__init__()
        self.dit = dit

    def forward(self, latents, timestep, prompt_emb, txt_ids, latent_ids, ref_latents=None, ref_ids=None,
                gradient_checkpointing: bool = False):
        batch, _, height, width = latents.shape
        if self.dit.gradient_checkpointing != gradient_checkpointing:
            (self.dit.enable_gradient_checkpointing if gradient_checkpointing
             else self.dit.disable_gradient_checkpointing)()
        timestep = timestep.reshape(-1).expand(batch) if timestep.numel() == 1 else timestep.reshape(batch)
        hidden = _pack(latents)
        tokens = hidden.shape[1]
        ids = latent_ids
        if ref_latents is not None:
            hidden = torch.cat([hidden, ref_latents], dim=1)
            ids = torch.cat([latent_ids, ref_ids], dim=0)
        out = self.dit(hidden_states=hidden, timestep=timestep / 1000, guidance=None,
                       encoder_hidden_states=prompt_emb, txt_ids=txt_ids, img_ids=ids, return_dict=False)[0]
        unpack = _pipeline().LongCatImageEditPipeline._unpack_latents
        return unpack(out[:, :tokens], height * 8, width * 8, 8)


class TrainingSchedule:
    """LongCat's training noise schedule with the interface the generic flow-matching loss draws from
    (``timesteps``, ``add_noise``, ``training_target``, ``training_weight``, as diffsynth's FlowMatchScheduler).

    1000 timesteps, from the noisiest down: the quantiles of sigmoid(N(0, 1)) time-shifted with mu =
    calculate_shift(TRAINING_SEQ_LEN) by the scheduler's own time_shift, so a uniform draw over them is LongCat's
    training distribution on a 1000-point grid. Every timestep weighs 1 (LongCat's loss is a plain MSE)."""

    def __init__(self, steps: int = 1000):
        from diffusers import FlowMatchEulerDiscreteScheduler

        scheduler = FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
        config = scheduler.config
        mu = _pipeline().calculate_shift(TRAINING_SEQ_LEN, config.base_image_seq_len, config.max_image_seq_len,
                                         config.base_shift, config.max_shift)
        quantiles = (torch.arange(steps, 0, -1, dtype=torch.float64) - 0.5) / steps
        logit_normal = torch.sigmoid(torch.distributions.Normal(0.0, 1.0).icdf(quantiles))
        self.sigmas = scheduler.time_shift(mu, 1.0, logit_normal).float()
        self.timesteps = self.sigmas * config.num_train_timesteps

    def _sigma(self, timestep) -> torch.Tensor:
        index = torch.argmin((self.timesteps - torch.as_tensor(timestep).float().cpu()).abs())
        return self.sigmas[index]

    def add_noise(self, x0, noise, timestep):
        sigma = self._sigma(timestep)
        return (1 - sigma) * x0 + sigma * noise

    def training_target(self, x0, noise, timestep):
        return noise - x0

    def training_weight(self, timestep):
        return torch.tensor(1.0)


@torch.no_grad()
def sample_flow(denoiser, conditioning: dict, negative_conditioning: dict | None, latent_shape, steps: int,
                guidance: float, generator, keep=None, device=None, dtype=torch.float32) -> torch.Tensor:
    """The pipeline's sampling loop on unpacked latents: its noise, sigmas, shift, Euler steps and true CFG (only
    when guidance > 1, the pipeline's rule). ``keep = (mask, known)`` holds latents outside the mask on the
    straight path to ``known``: there the velocity is (x - known) / sigma, which the Euler step takes to
    known + sigma_next / sigma * (x - known)."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from diffusers.utils.torch_utils import randn_tensor

    pipeline = _pipeline()
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)
    config = scheduler.config
    height, width = latent_shape[-2:]
    mu = pipeline.calculate_shift((height // 2) * (width // 2), config.base_image_seq_len, config.max_image_seq_len,
                                  config.base_shift, config.max_shift)
    sigmas = np.linspace(1.0, 1.0 / steps, steps)
    timesteps, _ = pipeline.retrieve_timesteps(scheduler, steps, device, sigmas=sigmas, mu=mu)
    latents = randn_tensor(tuple(latent_shape), generator=generator, device=torch.device(device or "cpu"), dtype=dtype)
    cfg = negative_conditioning is not None and guidance > 1
    for i, t in enumerate(timesteps):
        timestep = t.expand(latents.shape[0]).to(latents.dtype)
        velocity = denoiser(latents=latents, timestep=timestep, **conditioning)
        if cfg:
            negative = denoiser(latents=latents, timestep=timestep, **negative_conditioning)
            velocity = negative + guidance * (velocity - negative)
        if keep is not None:
            mask, known = keep
            back_to_known = (latents - known) / scheduler.sigmas[i]
            velocity = back_to_known * (1 - mask) + velocity * mask
        latents = scheduler.step(velocity, t, latents, return_dict=False)[0]
    return latents
