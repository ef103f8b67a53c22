"""LongCat-Image-Edit's phase-1 encoding, shared by phase 1 and sampling: LongCatImageEditPipeline's own prompt and
VAE code, called on a pipeline that holds just the encoders.

What ``__call__`` does and we do the same way: the prompt goes through ``encode_prompt`` with the reference resized
by the pipeline's image processor to half its size (``prompt_image``); images go through
``image_processor.preprocess`` and ``_encode_vae_image`` (the latent distribution's mode, then the VAE's shift and
scale). One deliberate difference: ``__call__`` first resizes the input to about 1024x1024 pixels; here images keep
the sizes phase 1's resize rules give them (``--max_pixels``, ``--multiple``), as for every family.
Latents are cached unpacked (C, h, w); the denoiser packs them (``_pack_latents``).
"""

from __future__ import annotations

import hashlib
import inspect

import torch
from PIL import Image

from ...dataset import Sample
from ...errors import EditTunerError
from ...images import ResizeConfig, mask_to_latent_grid
from ..base import ImageSides
from .models import Encoders, place
from .presets import PROMPT_TEMPLATE


def template_identity() -> str:
    """The pipeline's encoding code (its template lives in ``__init__``) and the diffusers version: if either
    changes, cached embeddings and latents are stale."""
    import diffusers
    from diffusers.pipelines.longcat_image import pipeline_longcat_image_edit as module

    cls = module.LongCatImageEditPipeline
    parts = [cls.__init__, cls._encode_prompt, cls.encode_prompt, cls._encode_vae_image, module.split_quotation]
    source = "".join(inspect.getsource(part) for part in parts)
    return f"diffusers-{diffusers.__version__}:" + hashlib.sha256(source.encode()).hexdigest()[:12]


def template_of(identity: dict) -> str | None:
    return PROMPT_TEMPLATE if identity.get("templates") == template_identity() else None


def make_encoding_pipe(encoders: Encoders, device, dtype):
    """A LongCatImageEditPipeline holding just the encoders, so its own encode functions run unchanged."""
    from diffusers import LongCatImageEditPipeline

    pipe = LongCatImageEditPipeline(scheduler=None, vae=encoders.vae, text_encoder=encoders.text_encoder,
                                    tokenizer=encoders.tokenizer, text_processor=encoders.text_processor,
                                    transformer=None)
    pipe.set_progress_bar_config(disable=True)
    place(encoders.text_encoder, device, dtype)
    place(encoders.vae, device, dtype)
    return pipe


def prompt_tokens(pipe, prompt: str) -> int:
    """How many tokens the pipeline makes of ``prompt``: quoted text is tokenized character by character."""
    from diffusers.pipelines.longcat_image.pipeline_longcat_image_edit import split_quotation

    count = 0
    for part, quoted in split_quotation(prompt):
        pieces = list(part) if quoted else [part]
        count += sum(len(pipe.tokenizer(p, add_special_tokens=False)["input_ids"]) for p in pieces)
    return count


def check_prompt(pipe, prompt: str) -> None:
    """The pipeline's prompt limit. Past it ``_encode_prompt`` means to truncate, but its warning raises a TypeError
    (``len(len(...))``), so such a prompt cannot be encoded by the pipeline at all: refuse it clearly."""
    count = prompt_tokens(pipe, prompt)
    if count > pipe.tokenizer_max_length:
        raise EditTunerError(f"the prompt has {count} tokens; LongCat-Image-Edit takes at most "
                             f"{pipe.tokenizer_max_length}: shorten it")


def prompt_image(pipe, reference: Image.Image) -> Image.Image:
    """The reference as ``__call__`` gives it to the vision encoder: resized to half its size."""
    return pipe.image_processor.resize(reference, reference.height // 2, reference.width // 2)


@torch.no_grad()
def encode_prompt(pipe, prompt: str, refs: list[Image.Image]) -> torch.Tensor:
    """prompt_emb (L, D): the pipeline's encode_prompt with the one reference as vision context."""
    if len(refs) != 1:
        raise EditTunerError(f"LongCat-Image-Edit takes exactly one reference image, not {len(refs)}")
    check_prompt(pipe, prompt)
    return pipe.encode_prompt(prompt=prompt, image=prompt_image(pipe, refs[0]))[0][0]


@torch.no_grad()
def encode_image(pipe, image: Image.Image) -> torch.Tensor:
    """VAE latents (C, h, w) as the pipeline makes its image latents (mode, shift, scale), unpacked."""
    pixels = pipe.image_processor.preprocess(image, image.height, image.width)
    weight = next(pipe.vae.parameters())
    return pipe._encode_vae_image(pixels.to(weight.device, weight.dtype), generator=None)[0]


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> Image.Image:
    """(1, C, h, w) latents to an RGB image the way the pipeline ends: undo scale and shift, decode, postprocess."""
    from diffusers.image_processor import VaeImageProcessor

    weight = next(vae.parameters())
    latents = latents.to(weight.device, weight.dtype) / vae.config.scaling_factor + vae.config.shift_factor
    pixels = vae.decode(latents, return_dict=False)[0]
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    return VaeImageProcessor(vae_scale_factor=scale * 2).postprocess(pixels, output_type="pil")[0]


class LongCatSampleEncoder(ImageSides):
    """The family's ``SampleEncoder``; ``attach`` gives it the loaded encoders (row checks need only sizes)."""

    prompt_template = PROMPT_TEMPLATE

    def attach(self, encoders: Encoders, device, dtype) -> None:
        self.pipe = make_encoding_pipe(encoders, device, dtype)

    def prepare(self, sample: Sample, resize: ResizeConfig):
        if self.pipe is not None:   # phase 1 prepares after attaching: an over-long prompt is a refused row
            check_prompt(self.pipe, sample.prompt)
        return super().prepare(sample, resize)

    def vision_size(self, width: int, height: int) -> tuple[int, int]:
        return width // 2, height // 2

    def vision_note(self) -> str:
        return "at half its size, as LongCat-Image-Edit's pipeline gives it to the Qwen2.5-VL encoder"

    def encode(self, prompt, target, refs, mask, negative_prompt=None) -> dict[str, torch.Tensor]:
        """Everything phase 2 needs for one sample; ``target`` None at inference time."""
        tensors = {"prompt_emb": encode_prompt(self.pipe, prompt, refs)}
        if negative_prompt is not None:
            tensors["negative_prompt_emb"] = encode_prompt(self.pipe, negative_prompt, refs)
        tensors["ref.0"] = encode_image(self.pipe, refs[0])
        if target is not None:
            tensors["target"] = encode_image(self.pipe, target)
            tensors["white"] = encode_image(self.pipe, Image.new("RGB", target.size, (255, 255, 255)))
            if mask is not None:
                tensors["mask"] = mask_to_latent_grid(mask, target.size)
        return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def encode_prompt(self, prompt: str, refs: list[Image.Image]) -> torch.Tensor:
        return encode_prompt(self.pipe, prompt, refs)

    def encode_image(self, image: Image.Image) -> torch.Tensor:
        return encode_image(self.pipe, image)
