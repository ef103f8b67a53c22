"""The model-family interface: what the trainer, phase 1, sampling, the app and the CLI may ask of an edit model.

A family (Qwen-Image-Edit, LongCat-Image-Edit, ...) is one module under ``edittuner/families/`` that
subclasses ``Family`` and registers an instance in ``families/__init__.py``. Its versions are ``Preset``s (the
``--model_version`` values, unique across families). Everything model-specific lives behind these methods:
nothing outside a family module branches on a model version.

Heavy imports (the engine, transformers) belong inside the methods, so that choosing a version (the CLI, the
launchers' ``--dry_run``) stays fast.
"""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Protocol

if TYPE_CHECKING:
    import torch
    from PIL import Image

    from ..dataset import Sample
    from ..images import ResizeConfig
    from ..models import ModelSource


@dataclass(frozen=True)
class Preset:
    """One version of a family: what it trains by default and what it takes as input.

    ``zero_cond_t``: the version's default for the switch (None: the family has no such switch, and turning it on
    is refused). ``max_references``: reference images per sample. ``prompt_template``: the family's name for how
    the prompt sees the references (part of the cache identity)."""

    family: str
    name: str
    base_model: str                 # what a LoRA file's metadata records
    lora_targets: tuple[str, ...]
    gradient_accumulation: int
    zero_cond_t: bool | None = None
    max_references: int = 3
    prompt_template: str = "multi"


@dataclass(frozen=True)
class RealSize:
    """The released model's sizes, for ``edittuner plan`` (plan.py traces the DiT at ``dit_config`` with fewer
    blocks and extrapolates; the encoders it counts). ``depth``: each config key that counts repeated blocks, with
    the fewest blocks a traced model may have (a LoRA preset may need more than one). ``offloaded``: the DiT's
    block lists that performance.py quantizes and offloads. ``vae_width``: the VAE's first-level channels (the
    phase-1 activation estimate at full resolution)."""

    dit_config: dict
    depth: dict
    offloaded: tuple[str, ...]
    text_encoder_parameters: int
    vae_parameters: int
    vae_width: int
    text_hidden: int = 3584          # Qwen2.5-VL-7B: the prompt embedding's width
    text_intermediate: int = 18944
    latent_channels: int = 16


@dataclass(frozen=True)
class ModelSpec:
    """A version as a run uses it: the preset with the run's switches. Objectives and samplers get this and
    ask its family for the denoiser's inputs, so they never know which model they drive."""

    family: "Family"
    preset: Preset
    zero_cond_t: bool = False

    def conditioning(self, samples: list[dict], device, dtype, gradient_checkpointing: bool = False,
                     latent_hw: tuple[int, int] | None = None) -> dict:
        return self.family.conditioning(self, samples, device, dtype, gradient_checkpointing, latent_hw)


class SampleEncoder(Protocol):
    """One version's phase-1 encoding of a sample, shared by phase 1, sampling and the app."""

    prompt_template: str

    def fit_reference(self, image: "Image.Image", resize: "ResizeConfig",
                      target: tuple[int, int] | None = None) -> "Image.Image": ...

    def prepare(self, sample: "Sample", resize: "ResizeConfig") -> tuple: ...

    def prepare_ref_gt(self, sample: "Sample", resize: "ResizeConfig") -> "Image.Image | None": ...

    def encode_ref_gt(self, image: "Image.Image") -> dict: ...

    def vision_size(self, width: int, height: int) -> tuple[int, int]: ...

    def vision_note(self) -> str: ...

    def attach(self, encoders: Any, device, dtype) -> None: ...

    def encode(self, prompt: str, target, refs: list, mask, negative_prompt: str | None = None) -> dict: ...

    def encode_prompt(self, prompt: str, refs: list) -> "torch.Tensor": ...

    def encode_image(self, image: "Image.Image") -> "torch.Tensor": ...

    def mask_to_latent_grid(self, mask: "Image.Image", size: tuple[int, int]) -> "torch.Tensor": ...


class ImageSides:
    """The image side a family's SampleEncoder inherits: references and targets sized by the resize rules, the
    mask on the 8x8 latent grid (``images.py``), a row's ref_gt and its latents (through the family's
    ``encode_image``); ``pipe`` is what ``attach`` gives (None before)."""

    pipe: Any = None

    def fit_reference(self, image: "Image.Image", resize: "ResizeConfig",
                      target: tuple[int, int] | None = None) -> "Image.Image":
        from ..images import fit_reference
        return fit_reference(image, resize, target)

    def prepare(self, sample: "Sample", resize: "ResizeConfig") -> tuple:
        from ..images import prepare_images
        return prepare_images(sample, resize)

    def prepare_ref_gt(self, sample: "Sample", resize: "ResizeConfig") -> "Image.Image | None":
        from ..images import prepare_ref_gt
        return prepare_ref_gt(sample, resize)

    def encode_ref_gt(self, image: "Image.Image") -> dict:
        """``ref_gt``: the VAE latents of a row's ref_gt (sized by ``prepare_ref_gt``), and ``ref_gt_white``: those
        of a white image its size, the start of the sub stream that bridges to it (the cache's ``white`` has the
        target's size, which a ref_gt need not share)."""
        from PIL import Image
        white = Image.new("RGB", image.size, (255, 255, 255))
        return {"ref_gt": self.encode_image(image).detach().to("cpu").contiguous(),
                "ref_gt_white": self.encode_image(white).detach().to("cpu").contiguous()}

    def mask_to_latent_grid(self, mask: "Image.Image", size: tuple[int, int]) -> "torch.Tensor":
        from ..images import mask_to_latent_grid
        return mask_to_latent_grid(mask, size)


class Family(ABC):
    """What every model family provides. ``presets`` maps version names to ``Preset``s."""

    name: str
    package: str                         # the family's package (its parts: denoiser, encoding, ...)
    base_model_prefix: str               # every preset's base_model starts with it (LoRA metadata)
    presets: dict[str, Preset]
    default_version: str
    lora_layouts: tuple[str, ...]        # export-lora formats its LoRA files can be written in
    components: tuple[str, ...]          # model-directory folders phase 1 and 2 need together
    unnamed_prompt_template: str | None = None   # the template of cache records from before they named one

    # ---- the model directory -------------------------------------------------------------------------------
    @property
    def encoder_components(self) -> tuple[str, ...]:
        """The model-directory folders phase 1 needs: all but the transformer."""
        return tuple(c for c in self.components if c != "transformer")

    @abstractmethod
    def check_model(self, source: "ModelSource", components: tuple[str, ...]) -> None:
        """Refuse a missing or incomplete model directory, listing what is missing."""

    @abstractmethod
    def load_dit(self, source: "ModelSource", dtype, device) -> "torch.nn.Module": ...

    def dit_skeleton(self, source: "ModelSource") -> "torch.nn.Module":
        """The DiT's modules on the meta device, from its config alone (no weights read): what a --lora_targets
        list is checked against before phase 1. The family's ``models`` module gives ``dit_config(source)`` and
        ``dit_skeleton(config)``, its ``tiny`` module ``TINY_DIT``."""
        models = self._part("models")
        tiny = source.is_tiny and not source.transformer_dir
        return models.dit_skeleton(self._part("tiny").TINY_DIT if tiny else models.dit_config(source))

    @abstractmethod
    def load_encoders(self, source: "ModelSource", dtype, device) -> Any: ...

    @abstractmethod
    def load_vae(self, source: "ModelSource", dtype, device) -> "torch.nn.Module": ...

    @abstractmethod
    def real_size(self, preset: Preset) -> RealSize:
        """The released model's sizes (``edittuner plan``)."""

    @abstractmethod
    def dit_from_config(self, config: dict) -> "torch.nn.Module":
        """The family's DiT class at ``config``'s sizes, built on the current default device (plan.py: meta)."""

    def plan_text_tokens(self, preset: Preset, references: int) -> int:
        """Prompt-embedding tokens of a one-sentence instruction with ``references`` images (the plan's default):
        per reference about 203 (a 384x384 vision input is 196 tokens, plus its markers), plus ~29."""
        return references * 203 + 29

    @abstractmethod
    def encoder_fingerprint(self, source: "ModelSource") -> str | None:
        """Identity of the encoders phase 1 uses (None: not available here)."""

    # ---- phase 1 ---------------------------------------------------------------------------------------------
    @abstractmethod
    def sample_encoder(self, preset: Preset, vl_pixels: int) -> SampleEncoder: ...

    @abstractmethod
    def prompt_identity(self, prompt_template: str | None = None) -> str:
        """The identity of the code that encodes prompts with ``prompt_template``: a change makes caches stale."""

    @abstractmethod
    def template_of(self, identity: dict) -> str | None:
        """Which prompt template a cache identity's prompts were encoded with (None: unknown code)."""

    # ---- phase 2 and sampling --------------------------------------------------------------------------------
    @abstractmethod
    def denoiser(self, dit: "torch.nn.Module") -> "torch.nn.Module":
        """The DiT as one module: forward(latents (B, C, h, w), timestep (B,), **conditioning) -> prediction."""

    @abstractmethod
    def conditioning(self, spec: ModelSpec, samples: list[dict], device, dtype, gradient_checkpointing: bool,
                     latent_hw: tuple[int, int] | None) -> dict:
        """The denoiser's inputs besides latents and timestep, for same-shape cached samples."""

    @abstractmethod
    def without_references(self, conditioning: dict) -> dict:
        """The conditioning with the reference tokens left out (LBM's streams that do not see them)."""

    @abstractmethod
    def training_scheduler(self) -> Any:
        """The flow-matching training schedule: ``timesteps``, ``add_noise``, ``training_target``,
        ``training_weight`` as the engine's FlowMatchScheduler has them."""

    # A family package's ``denoiser`` module provides ``select_rows`` and ``sample_flow``, its ``encoding`` module
    # ``decode_latents``: these forward to them (a family with other parts overrides the method).
    def _part(self, module: str):
        return importlib.import_module(f"{self.package}.{module}")

    def select_rows(self, conditioning: dict, rows: list[int]) -> dict:
        return self._part("denoiser").select_rows(conditioning, rows)

    def sample_flow(self, denoiser: Callable, conditioning: dict, negative_conditioning: dict | None, latent_shape,
                    steps: int, guidance: float, generator, keep=None, device=None, dtype=None) -> "torch.Tensor":
        return self._part("denoiser").sample_flow(denoiser, conditioning, negative_conditioning, latent_shape, steps,
                                                  guidance, generator, keep, device, dtype)

    def decode(self, vae: "torch.nn.Module", latents: "torch.Tensor") -> "Image.Image":
        return self._part("encoding").decode_latents(vae, latents)

    def blocks(self, dit: "torch.nn.Module") -> list["torch.nn.Module"]:
        """The DiT's repeated blocks in forward order, each one's output feeding the next: what the levers
        (compiled blocks, int8/fp8 base, block offload) walk. The default is a single ``transformer_blocks`` stack."""
        return list(dit.transformer_blocks)

    @abstractmethod
    def selects_module(self, name: str, targets: tuple[str, ...], dit: "torch.nn.Module") -> bool:
        """Whether the Linear layer ``name`` of ``dit`` gets a LoRA for ``targets`` (dead ends left out)."""

    def lora_module_names(self, dit: "torch.nn.Module", targets: tuple[str, ...]) -> list[str]:
        """Full names of the Linear layers ``targets`` select, minus those whose output never reaches the loss."""
        import torch
        return [name for name, module in dit.named_modules()
                if isinstance(module, torch.nn.Linear) and self.selects_module(name, targets, dit)]

    # ---- shared rules ----------------------------------------------------------------------------------------
    def reference_refusal(self, preset: Preset, count: int) -> str | None:
        """Why ``count`` reference images do not fit ``preset``; None when they do."""
        if 1 <= count <= preset.max_references:
            return None
        fitting = [name for name, p in sorted(self.presets.items()) if p.max_references >= count]
        way_out = f"; drop the extra references, or use --model_version {' or '.join(fitting)}" \
            if count > preset.max_references and fitting else ""
        takes = "exactly 1" if preset.max_references == 1 else f"1 to {preset.max_references}"
        return (f"{count} reference image(s), but {preset.base_model} (--model_version {preset.name}) takes {takes} "
                f"(the first is the one edited){way_out}")
