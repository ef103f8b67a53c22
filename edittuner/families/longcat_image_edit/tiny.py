"""The built-in tiny LongCat-Image-Edit: the pipeline's own classes at tiny sizes, made deterministically from a seed.

The tokenizer, the Qwen2-VL processor and the Qwen2.5-VL config (vision tower included) are the Qwen family's tiny
builders: LongCat's text side is the same Qwen2.5-VL stack. The transformer is diffusers'
LongCatImageTransformer2DModel with one double- and one single-stream block; the VAE is diffusers' AutoencoderKL
with 16 latent channels and an 8x downsampling (as the real one), loaded from ``tiny_vae.safetensors`` beside this
file (fitted to the demo photos by ``scripts/fit_tiny_vae.py``, its shift_factor / scaling_factor calibrated there and
kept in the file's metadata). The transformer of seed 0 loads ``tiny_dit.safetensors``, a base fitted by
``scripts/fit_tiny_dit.py`` to reproduce its reference (as Qwen's tiny DiT); other seeds give random inits.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache
from pathlib import Path

import torch

from ..qwen_image_edit.tiny import (SPECIAL_TOKENS, TINY_TEXT_DIM, _calibration_images, _round3, _seeded,
                                    build_processor, build_tokenizer, fitted_weights, tiny_text_encoder_config,
                                    weights_digest, with_fitted_base)
from .models import SCHEDULER_CONFIG, Encoders

# Width 128 (8 heads of 16): narrower than a 2x2 patch of 16 latent channels (64), the stream could not copy it.
TINY_DIT = {"patch_size": 1, "in_channels": 64, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
            "num_attention_heads": 8, "joint_attention_dim": TINY_TEXT_DIM, "pooled_projection_dim": TINY_TEXT_DIM,
            "axes_dims_rope": [4, 6, 6]}
# Four resolution levels: the pipeline's vae_scale_factor (2 ** (levels - 1)) is 8, as the real VAE's. No quant
# convs, as the FLUX.1 VAE LongCat uses.
TINY_VAE = {"in_channels": 3, "out_channels": 3, "down_block_types": ["DownEncoderBlock2D"] * 4,
            "up_block_types": ["UpDecoderBlock2D"] * 4, "block_out_channels": [8, 16, 16, 16], "layers_per_block": 1,
            "latent_channels": 16, "norm_num_groups": 4, "sample_size": 64, "use_quant_conv": False,
            "use_post_quant_conv": False}
TINY_VAE_WEIGHTS = Path(__file__).with_name("tiny_vae.safetensors")
TINY_DIT_WEIGHTS = Path(__file__).with_name("tiny_dit.safetensors")


def random_tiny_dit(seed: int = 0):
    from diffusers import LongCatImageTransformer2DModel

    rng = _seeded(seed, 11)
    try:
        return LongCatImageTransformer2DModel(**TINY_DIT)
    finally:
        rng.__exit__(None, None, None)


def build_tiny_dit(seed: int = 0):
    return with_fitted_base(random_tiny_dit(seed), seed, TINY_DIT_WEIGHTS)


@torch.no_grad()
def calibrate_latent_scale(vae) -> None:
    """Give the tiny VAE (fitted by scripts/fit_tiny_vae.py) a shift_factor and scaling_factor that do for it what the real ones do for the real
    VAE: the pipeline's (mode - shift) * scale has mean 0 and std 1 over smooth random images (a random encoder's
    raw latents are a near-constant offset with a small spread, which a model could hardly tell apart).

    Measured on one thread and rounded to 3 significant digits: the tiny model must be bitwise the same in every
    process, and conv results depend on the thread count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        raw = vae.encode(_calibration_images()).latent_dist.mode().double()
    finally:
        torch.set_num_threads(threads)
    shift = _round3(raw.mean().reshape(1))
    scale = _round3((1 / raw.std().clamp_min(1e-6)).reshape(1))
    vae.register_to_config(shift_factor=float(shift), scaling_factor=float(scale))


@lru_cache(maxsize=4)
def _tiny_encoder_state(seed: int):
    from safetensors import safe_open
    from transformers import Qwen2_5_VLForConditionalGeneration

    rng = _seeded(seed, 12)
    try:
        text_encoder = Qwen2_5_VLForConditionalGeneration(tiny_text_encoder_config())
    finally:
        rng.__exit__(None, None, None)
    vae_state = fitted_weights(TINY_VAE_WEIGHTS)
    with safe_open(str(TINY_VAE_WEIGHTS), framework="pt") as f:
        metadata = f.metadata()
    return text_encoder.state_dict(), vae_state, (float(metadata["shift_factor"]), float(metadata["scaling_factor"]))


def build_tiny_vae(seed: int = 0):
    from diffusers import AutoencoderKL

    _, vae_state, (shift, scale) = _tiny_encoder_state(seed)
    vae = AutoencoderKL(**TINY_VAE, shift_factor=shift, scaling_factor=scale)
    vae.load_state_dict(vae_state)
    return vae.eval()


def build_tiny_encoders(seed: int = 0) -> Encoders:
    from transformers import Qwen2_5_VLForConditionalGeneration

    te_state, _, _ = _tiny_encoder_state(seed)
    text_encoder = Qwen2_5_VLForConditionalGeneration(tiny_text_encoder_config())
    text_encoder.load_state_dict(te_state)
    return Encoders(text_encoder.eval(), build_tokenizer(), build_processor(), build_tiny_vae(seed),
                    tiny_fingerprint(seed))


def build_tiny_scheduler():
    from diffusers import FlowMatchEulerDiscreteScheduler
    return FlowMatchEulerDiscreteScheduler.from_config(SCHEDULER_CONFIG)


def tiny_fingerprint(seed: int) -> str:
    spec = json.dumps({"family": "longcat", "seed": seed, "text": tiny_text_encoder_config().to_dict(),
                       "vae": TINY_VAE, "vae_weights": weights_digest(TINY_VAE_WEIGHTS), "tokens": SPECIAL_TOKENS},
                      sort_keys=True, default=str)
    return "tiny-longcat:" + hashlib.sha256(spec.encode()).hexdigest()[:16]
