"""Qwen-Image-Edit, the first family: the original (2508), 2509 and 2511, on the pinned ``diffsynth`` engine.

This module is light (no engine import): the ``Family`` methods over the versions' ``presets``; they
import their parts when called: ``models`` (the engine's classes at any size, the official layout),
``tiny`` (the built-in tiny model), ``encoding`` (the engine's prompt unit and its two templates, VAE latents,
the mask on the latent grid) and ``denoiser`` (batched model function, training schedule, flow sampler).
"""

from __future__ import annotations

from ..base import Family, ModelSpec, RealSize
from .presets import NAME, PRESETS, UNNAMED_PROMPT_TEMPLATE, selects_module


class QwenImageEdit(Family):
    """Qwen-Image-Edit on the engine: tiny when --model_dir is tiny and no component folder overrides it."""

    name = NAME
    package = __name__   # where _part finds its denoiser and encoding modules
    base_model_prefix = "Qwen-Image-Edit-"
    presets = PRESETS
    default_version = "2511"
    lora_layouts = ("diffsynth", "comfyui", "diffusers")
    components = ("transformer", "text_encoder", "vae", "processor")
    unnamed_prompt_template = UNNAMED_PROMPT_TEMPLATE

    # ---- the model directory ---------------------------------------------------------------------------------
    def check_model(self, source, components):
        from .layout import check_model
        check_model(source, components)

    def load_dit(self, source, dtype, device):
        if source.is_tiny and not source.transformer_dir:
            from .tiny import build_tiny_dit
            return build_tiny_dit(source.tiny_seed).to(device=device, dtype=dtype)
        from .models import load_dit
        return load_dit(source, dtype, device)

    def load_encoders(self, source, dtype, device):
        if source.uses_tiny_encoders:
            from .tiny import build_tiny_encoders
            encoders = build_tiny_encoders(source.tiny_seed)
            encoders.text_encoder.to(device=device, dtype=dtype)
            encoders.vae.to(device=device, dtype=dtype)
            return encoders
        from .models import load_encoders
        return load_encoders(source, dtype, device, self.encoder_fingerprint(source))

    def load_vae(self, source, dtype, device):
        if source.uses_tiny_encoders:
            from .tiny import build_tiny_encoders
            return build_tiny_encoders(source.tiny_seed).vae.to(device=device, dtype=dtype)
        from .models import load_vae
        return load_vae(source, dtype, device)

    def real_size(self, preset):
        # The released 20B DiT (diffusers' transformer config; EditDiT's defaults), Qwen2.5-VL-7B (8.29 B
        # parameters with its vision tower) and the Qwen-Image VAE (127 M, base width 96). Two blocks at least:
        # the 2511 preset's last-block dead ends leave one block without some of its targets.
        return RealSize(dit_config={"num_layers": 60, "attention_head_dim": 128, "num_attention_heads": 24,
                                    "joint_attention_dim": 3584, "axes_dims_rope": (16, 56, 56)},
                        depth={"num_layers": 2}, offloaded=("transformer_blocks",),
                        text_encoder_parameters=8_292_166_656, vae_parameters=126_892_531, vae_width=96)

    def dit_from_config(self, config):
        from .models import EditDiT
        return EditDiT(**config)

    def encoder_fingerprint(self, source):
        if source.uses_tiny_encoders:
            from .tiny import tiny_fingerprint
            return tiny_fingerprint(source.tiny_seed)
        from .layout import encoder_fingerprint
        return encoder_fingerprint(source)

    # ---- phase 1 ---------------------------------------------------------------------------------------------
    def sample_encoder(self, preset, vl_pixels):
        from .encoding import QwenSampleEncoder
        return QwenSampleEncoder(preset.prompt_template, vl_pixels)

    def prompt_identity(self, prompt_template=None):
        from .encoding import template_identity
        return template_identity(prompt_template)

    def template_of(self, identity):
        from .encoding import template_of
        return template_of(identity)

    # ---- phase 2 and sampling --------------------------------------------------------------------------------
    def denoiser(self, dit):
        from .denoiser import DiTDenoiser
        return DiTDenoiser(dit)

    def conditioning(self, spec: ModelSpec, samples, device, dtype, gradient_checkpointing=False, latent_hw=None):
        from .denoiser import collate_conditioning
        return collate_conditioning(samples, device, dtype, spec.zero_cond_t, gradient_checkpointing, latent_hw)

    def without_references(self, conditioning):
        return {**conditioning, "edit_latents": None}

    def training_scheduler(self):
        from .denoiser import training_scheduler
        return training_scheduler()

    def selects_module(self, name, targets, dit):
        return selects_module(name, targets, len(dit.transformer_blocks))
