"""The Qwen-Image-Edit encoding shared by phase 1 and sampling: the engine's prompt unit with the references as
vision context (its two templates), reference sizing, VAE latents of target / references / white image, and the
edit mask on the latent grid. The cache module stores what this makes; sampling uses it directly."""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass

import torch
from PIL import Image

from ...errors import EditTunerError
from ...images import mask_to_latent_grid
from ..base import ImageSides
from .models import Encoders
from .presets import UNNAMED_PROMPT_TEMPLATE



@dataclass(frozen=True)
class PromptTemplate:
    """One of the engine's two prompt paths (``QwenImageUnit_PromptEmbedder.process``), a Preset's prompt_template."""

    engine_function: str    # the unit's method that encodes it; its source is part of the cache identity
    one_image: bool         # the unit gets one PIL image, not a list


# "multi" (2509, 2511): a list -> encode_prompt_edit_multi: "Picture N: <image>" per reference, each resized by the
#   unit to --vl_pixels (the engine's 384^2) for the Qwen2.5-VL encoder.
# "single" (the original Qwen-Image-Edit): one PIL image -> encode_prompt_edit: the image without a prefix and without
#   a resize: the engine's pipeline hands the unit the reference its EditImageEmbedder sized for the VAE, so the
#   vision encoder sees the very image whose latents the DiT gets.
PROMPT_TEMPLATES = {"multi": PromptTemplate("encode_prompt_edit_multi", one_image=False),
                    "single": PromptTemplate("encode_prompt_edit", one_image=True)}
LEGACY_PROMPT_TEMPLATE = UNNAMED_PROMPT_TEMPLATE   # the template of records and calls that name none


def template_identity(prompt_template: str | None = None) -> str:
    """The engine's prompt code for ``prompt_template`` (default: "multi") and the engine version:
    if either changes, old prompt embeddings are stale. The two templates hash different code, so their caches
    never pass for each other."""
    import diffsynth
    from diffsynth.pipelines.qwen_image import QwenImageUnit_PromptEmbedder

    template = PROMPT_TEMPLATES[prompt_template or LEGACY_PROMPT_TEMPLATE]
    source = inspect.getsource(getattr(QwenImageUnit_PromptEmbedder, template.engine_function))
    version = getattr(diffsynth, "__version__", None) or _dist_version("diffsynth")
    return f"diffsynth-{version}:" + hashlib.sha256(source.encode()).hexdigest()[:12]


def template_of(identity: dict) -> str | None:
    """Which of PROMPT_TEMPLATES a cache identity's prompts were encoded with (None: another engine version)."""
    return next((name for name in PROMPT_TEMPLATES if identity.get("templates") == template_identity(name)), None)


def _dist_version(name: str) -> str:
    from importlib.metadata import version
    return version(name)


def make_encoding_pipe(encoders: Encoders, device, dtype):
    """A diffsynth QwenImagePipeline holding just what phase 1 needs, so the engine's units run unchanged."""
    from diffsynth.pipelines.qwen_image import QwenImagePipeline

    pipe = QwenImagePipeline(device=device, torch_dtype=dtype)
    pipe.text_encoder = encoders.text_encoder
    pipe.processor = encoders.processor
    pipe.vae = encoders.vae
    return pipe


def reference_prompt_embedder(vl_pixels: int, prompt_template: str | None = None):
    """The engine's prompt unit for ``prompt_template`` (PROMPT_TEMPLATES; default: "multi"), with the
    multi template's reference resize for the VL encoder taken from ``vl_pixels``."""
    from diffsynth.pipelines.qwen_image import QwenImageUnit_PromptEmbedder

    name = prompt_template or LEGACY_PROMPT_TEMPLATE
    template = PROMPT_TEMPLATES[name]

    class ReferencePromptEmbedder(QwenImageUnit_PromptEmbedder):
        prompt_template = name

        def resize_image(self, image, target_area=None):
            return super().resize_image(image, target_area=vl_pixels)

        def encode(self, pipe, prompt: str, refs: list[Image.Image]) -> torch.Tensor:
            """prompt_emb (L, D) of ``prompt`` with ``refs`` as vision context, by the engine's path for the template."""
            if template.one_image and len(refs) != 1:
                raise EditTunerError(f"the engine's {name}-image prompt template takes one reference, not {len(refs)}")
            edit_image = refs[0] if template.one_image else list(refs)
            return self.process(pipe, prompt, edit_image=edit_image)["prompt_emb"][0]

        def vision_size(self, width: int, height: int) -> tuple[int, int]:
            """The size a reference of this size reaches the Qwen2.5-VL encoder at."""
            return (width, height) if template.one_image else self.calculate_dimensions(vl_pixels, width / height)

        def vision_note(self) -> str:
            return ("as sized for the model (the engine's single-image template gives it to the Qwen2.5-VL encoder "
                    "unresized)") if template.one_image else \
                f"resized by the engine for the Qwen2.5-VL encoder at --vl_pixels {vl_pixels}"

    return ReferencePromptEmbedder()


@torch.no_grad()
def encode_images_and_prompt(pipe, embedder, prompt: str, target: Image.Image | None, refs: list[Image.Image],
                             mask: Image.Image | None, negative_prompt: str | None = None) -> dict[str, torch.Tensor]:
    """Everything phase 2 needs for one sample. ``target`` may be None at inference time; ``negative_prompt``
    (validation samples) adds the CFG negative's embeddings, encoded with the same references."""
    encode = lambda img: pipe.vae.encode(pipe.preprocess_image(img))[0]  # noqa: E731
    tensors = {"prompt_emb": embedder.encode(pipe, prompt, refs)}
    if negative_prompt is not None:
        tensors["negative_prompt_emb"] = embedder.encode(pipe, negative_prompt, refs)
    for k, ref in enumerate(refs):
        tensors[f"ref.{k}"] = encode(ref)
    if target is not None:
        tensors["target"] = encode(target)
        tensors["white"] = encode(Image.new("RGB", target.size, (255, 255, 255)))
        if mask is not None:
            tensors["mask"] = mask_to_latent_grid(mask, target.size)
    return {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> Image.Image:
    """VAE-decode (1, 16, h, w) latents to an RGB image, with the engine's [-1, 1] -> uint8 rule."""
    weight = next(vae.parameters())
    pixels = vae.decode(latents.to(weight.device, weight.dtype))[0].permute(1, 2, 0)
    return Image.fromarray(((pixels + 1) * 127.5).clip(0, 255).to("cpu", torch.uint8).numpy())


class QwenSampleEncoder(ImageSides):
    """The family's ``SampleEncoder``: one version's prompt template at ``vl_pixels``; ``attach`` gives it the
    loaded encoders (row checks before that need only the sizes)."""

    def __init__(self, prompt_template: str, vl_pixels: int):
        self.prompt_template = prompt_template
        self.embedder = reference_prompt_embedder(vl_pixels, prompt_template)

    def attach(self, encoders: Encoders, device, dtype) -> None:
        self.pipe = make_encoding_pipe(encoders, device, dtype)

    def vision_size(self, width: int, height: int) -> tuple[int, int]:
        return self.embedder.vision_size(width, height)

    def vision_note(self) -> str:
        return self.embedder.vision_note()

    def encode(self, prompt, target, refs, mask, negative_prompt=None) -> dict[str, torch.Tensor]:
        return encode_images_and_prompt(self.pipe, self.embedder, prompt, target, refs, mask, negative_prompt)

    @torch.no_grad()
    def encode_prompt(self, prompt: str, refs: list[Image.Image]) -> torch.Tensor:
        return self.embedder.encode(self.pipe, prompt, refs)

    @torch.no_grad()
    def encode_image(self, image: Image.Image) -> torch.Tensor:
        return self.pipe.vae.encode(self.pipe.preprocess_image(image))[0]
