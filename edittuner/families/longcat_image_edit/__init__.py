"""LongCat-Image-Edit (meituan-longcat), the second family: ``--model_version longcat``, on diffusers' classes
(LongCatImageTransformer2DModel, AutoencoderKL, FlowMatchEulerDiscreteScheduler; transformers' Qwen2.5-VL).

This module is light (no diffusers import): the ``Family`` methods over the version's ``presets``; they import
their parts when called: ``models`` (the official layout, its checks and loading), ``tiny`` (the built-in tiny
model), ``encoding`` (the pipeline's prompt and VAE code) and ``denoiser`` (the transformer as a denoiser, the
training schedule, the pipeline's sampling loop).
"""

from __future__ import annotations

from ..base import Family, ModelSpec, RealSize
from .presets import NAME, PRESETS, VERSION, selects_module


class LongCatImageEdit(Family):
    """LongCat-Image-Edit: tiny when --model_dir is tiny and no component folder overrides it."""

    name = NAME
    package = __name__   # where _part finds its denoiser and encoding modules
    base_model_prefix = "LongCat-Image-Edit"
    presets = PRESETS
    default_version = VERSION
    # Our own layout (diffusion_model.<diffusers module name>) and diffusers' (transformer.<module name>), which
    # the transformer's load_lora_adapter reads.
    lora_layouts = ("diffsynth", "diffusers")
    components = ("transformer", "text_encoder", "tokenizer", "text_processor", "vae", "scheduler")

    # ---- the model directory ---------------------------------------------------------------------------------
    def check_model(self, source, components):
        from .models import check_model
        check_model(source, components)

    def load_dit(self, source, dtype, device):
        if source.is_tiny and not source.transformer_dir:
            from .models import place
            from .tiny import build_tiny_dit
            return place(build_tiny_dit(source.tiny_seed), device, dtype)
        from .models import load_dit
        return load_dit(source, dtype, device)

    def load_encoders(self, source, dtype, device):
        if source.uses_tiny_encoders:
            from .tiny import build_tiny_encoders
            from .models import place
            encoders = build_tiny_encoders(source.tiny_seed)
            place(encoders.text_encoder, device, dtype)
            place(encoders.vae, device, dtype)
            return encoders
        from .models import load_encoders
        return load_encoders(source, dtype, device, self.encoder_fingerprint(source))

    def load_vae(self, source, dtype, device):
        if source.uses_tiny_encoders:
            from .models import place
            from .tiny import build_tiny_vae
            return place(build_tiny_vae(source.tiny_seed), device, dtype)
        from .models import load_vae
        return load_vae(source, dtype, device)

    def real_size(self, preset):
        # LongCat-Image-Edit's transformer/config.json: FLUX-like, 10 double-stream and 20 single-stream blocks,
        # 24 heads x 128, Qwen2.5-VL-7B's 3584-wide embeddings; FLUX.1's VAE (83.8 M, base width 128).
        # performance.py quantizes and offloads transformer_blocks (the double-stream ones) only.
        return RealSize(dit_config={"patch_size": 1, "in_channels": 64, "num_layers": 10, "num_single_layers": 20,
                                    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584,
                                    "pooled_projection_dim": 3584, "axes_dims_rope": [16, 56, 56]},
                        depth={"num_layers": 1, "num_single_layers": 1}, offloaded=("transformer_blocks",),
                        text_encoder_parameters=8_292_166_656, vae_parameters=83_819_683, vae_width=128)

    def dit_from_config(self, config):
        from diffusers import LongCatImageTransformer2DModel
        return LongCatImageTransformer2DModel(**config)

    def encoder_fingerprint(self, source):
        if source.uses_tiny_encoders:
            from .tiny import tiny_fingerprint
            return tiny_fingerprint(source.tiny_seed)
        from .models import encoder_fingerprint
        return encoder_fingerprint(source)

    # ---- phase 1 ---------------------------------------------------------------------------------------------
    def sample_encoder(self, preset, vl_pixels):
        # vl_pixels is Qwen's: LongCat's pipeline gives the vision encoder the reference at half its size.
        from .encoding import LongCatSampleEncoder
        return LongCatSampleEncoder()

    def prompt_identity(self, prompt_template=None):
        from .encoding import template_identity
        return template_identity()

    def template_of(self, identity):
        from .encoding import template_of
        return template_of(identity)

    # ---- phase 2 and sampling --------------------------------------------------------------------------------
    def denoiser(self, dit):
        from .denoiser import LongCatDenoiser
        return LongCatDenoiser(dit)

    def conditioning(self, spec: ModelSpec, samples, device, dtype, gradient_checkpointing=False, latent_hw=None):
        from .denoiser import collate_conditioning
        return collate_conditioning(samples, device, dtype, gradient_checkpointing, latent_hw)

    def without_references(self, conditioning):
        from .denoiser import without_references
        return without_references(conditioning)

    def training_scheduler(self):
        from .denoiser import TrainingSchedule
        return TrainingSchedule()

    def blocks(self, dit):
        # The Flux layout: the double-stream blocks, then the single-stream ones, which take the last double
        # block's text and image streams (transformer_longcat_image.py's forward).
        return [*dit.transformer_blocks, *dit.single_transformer_blocks]

    def selects_module(self, name, targets, dit):
        return selects_module(name, targets)
