"""`edittuner sample`: edit an image with the base model and an optional LoRA.

Sampler: ``bridge`` integrates the Latent Bridge Matching path in N steps (default 1) from the first reference's
latents (main stream) or from a white image's latents (sub stream). Prompt and references are encoded exactly as
phase 1 encodes them, and the LoRA is fused with the engine's own LoRA loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image

from .atomic import atomic_path
from .cache import encode_images_and_prompt, load_references, make_encoding_pipe, reference_prompt_embedder
from .errors import EditTunerError
from .images import ResizeConfig
from .lora import PRESETS, load_lora_file
from .models import ModelSource
from .objectives import DiTDenoiser, dit_conditioning, sample_bridge


@dataclass(frozen=True)
class SampleConfig:
    references: tuple[Path, ...]
    prompt: str
    output: Path
    model: ModelSource = field(default_factory=ModelSource)
    model_version: str = "2511"
    lora: Path | None = None
    lora_strength: float = 1.0
    sampler: str = "bridge"
    steps: int = 1
    seed: int = 0
    stream: str = "main"
    bridge_sigma: float = 0.0
    main_stream_references: bool = True
    resize: ResizeConfig = field(default_factory=ResizeConfig)

    def __post_init__(self):
        if not 1 <= len(self.references) <= 3:
            raise EditTunerError("--image: give 1 to 3 reference images (the first is the one being edited)")
        if not self.prompt.strip():
            raise EditTunerError("--prompt: empty; write the edit instruction")
        if self.sampler != "bridge":
            raise EditTunerError(f"--sampler {self.sampler}: only 'bridge' is available")
        if self.steps < 1:
            raise EditTunerError(f"--steps {self.steps}: must be at least 1")
        if self.stream not in ("main", "sub"):
            raise EditTunerError(f"--stream {self.stream}: choose main or sub")
        if self.model_version not in PRESETS:
            raise EditTunerError(f"--model_version {self.model_version}: choose one of {sorted(PRESETS)}")
        if not 0 <= self.bridge_sigma <= 1:
            raise EditTunerError(f"--bridge_sigma {self.bridge_sigma}: must be in [0, 1]")


def fuse_lora(dit: torch.nn.Module, path: Path, strength: float) -> None:
    """W += strength * B @ A for every layer in the file, with the engine's loader; a mismatch is an error."""
    from diffsynth.utils.lora.general import GeneralLoRALoader

    state = load_lora_file(path)
    layers = {k.rsplit(".lora_", 1)[0] for k in state}
    known = {name for name, _ in dit.named_modules()}
    unknown = sorted(layers - known)
    if unknown:
        raise EditTunerError(f"--lora {path}: {len(unknown)} layers do not exist in this base model "
                             f"(e.g. {unknown[:2]}); it was trained on another model")
    for key, value in state.items():
        if ".lora_B." in key:
            module = dit.get_submodule(key.rsplit(".lora_", 1)[0])
            if value.shape[0] != module.weight.shape[0]:
                raise EditTunerError(f"--lora {path}: {key} has shape {tuple(value.shape)}, which does not fit "
                                     f"this base model's {tuple(module.weight.shape)}; it was trained on another model")
    loader = GeneralLoRALoader(device=dit.proj_out.weight.device, torch_dtype=dit.proj_out.weight.dtype)
    loader.fuse_lora_to_base_model(dit, state, alpha=strength)


@torch.no_grad()
def edit_latents(cfg: SampleConfig, dit, pipe) -> torch.Tensor:
    embedder = reference_prompt_embedder(cfg.resize.vl_pixels)
    refs = load_references(cfg.references, cfg.resize)
    encoded = encode_images_and_prompt(pipe, embedder, cfg.prompt, None, refs, None)
    device, dtype = pipe.device, pipe.torch_dtype
    if cfg.stream == "main":
        z_start = encoded["ref.0"][None].to(device, dtype)
    else:
        white = Image.new("RGB", refs[0].size, (255, 255, 255))
        z_start = pipe.vae.encode(pipe.preprocess_image(white)).to(device, dtype)
    conditioning = dit_conditioning(encoded, device, dtype, PRESETS[cfg.model_version].zero_cond_t,
                                    latent_hw=tuple(z_start.shape[-2:]))
    if cfg.stream == "main" and not cfg.main_stream_references:
        conditioning["edit_latents"] = None
    generator = torch.Generator().manual_seed(cfg.seed)
    return sample_bridge(DiTDenoiser(dit), z_start, conditioning, steps=cfg.steps, sigma=cfg.bridge_sigma,
                         generator=generator)


def sample_image(cfg: SampleConfig) -> Path:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    cfg.model.check(("transformer", "text_encoder", "vae", "processor"))
    dit = cfg.model.load_dit(dtype=dtype, device=device).eval()
    if cfg.lora:
        fuse_lora(dit, Path(cfg.lora), cfg.lora_strength)
    pipe = make_encoding_pipe(cfg.model.load_encoders(dtype=dtype, device=device), device, dtype)
    latents = edit_latents(cfg, dit, pipe)
    with torch.no_grad():
        image = pipe.vae_output_to_image(pipe.vae.decode(latents))
    output = Path(cfg.output)
    with atomic_path(output) as tmp:
        image.save(tmp, format=(output.suffix.lstrip(".") or "png").upper().replace("JPG", "JPEG"))
    return output
