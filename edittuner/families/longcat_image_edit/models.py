"""LongCat-Image-Edit's model directory: the official diffusers layout of meituan-longcat/LongCat-Image-Edit, its
checks and loading, on diffusers' and transformers' own classes (the ones LongCatImageEditPipeline registers).

Layout (the pipeline's component names): transformer/, text_encoder/, tokenizer/, text_processor/, vae/,
scheduler/. Of ModelSource's per-component flags, --transformer_dir, --text_encoder_dir and --vae_dir map onto
the folders of the same name and --processor_dir onto text_processor/; tokenizer/ and scheduler/ have no flag and
always come from --model_dir.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from safetensors import SafetensorError

from ...errors import EditTunerError
from ...weights import check_weight_files, hash_folder, missing_files, read_json, weight_files

if TYPE_CHECKING:
    from ...models import ModelSource

COMPONENTS = ("transformer", "text_encoder", "tokenizer", "text_processor", "vae", "scheduler")
OVERRIDE_FLAGS = {"transformer": "transformer_dir", "text_encoder": "text_encoder_dir", "vae": "vae_dir",
                  "text_processor": "processor_dir"}
ENCODER_COMPONENTS = ("text_encoder", "tokenizer", "text_processor", "vae")

REQUIRED_FILES = {
    "transformer": ["config.json", ("diffusion_pytorch_model.safetensors.index.json",
                                    "diffusion_pytorch_model.safetensors")],
    "text_encoder": ["config.json", ("model.safetensors.index.json", "model.safetensors")],
    "tokenizer": ["tokenizer_config.json", ("tokenizer.json", "vocab.json")],
    # Qwen2VLProcessor.from_pretrained reads its image processor and its own copy of the tokenizer.
    "text_processor": [("preprocessor_config.json", "processor_config.json"), ("tokenizer.json", "vocab.json")],
    "vae": ["config.json", "diffusion_pytorch_model.safetensors"],
    "scheduler": ["scheduler_config.json"],
}

# The sampler's and the training schedule's settings. LongCat-Image-Edit ships FLUX.1's flow-match scheduler config;
# its pipeline reads exactly these keys (calculate_shift's sequence lengths and shifts, dynamic shifting on).
# A model directory whose scheduler/ says otherwise is refused (check_scheduler), so the constant never drifts.
SCHEDULER_CONFIG = {"base_image_seq_len": 256, "base_shift": 0.5, "max_image_seq_len": 4096, "max_shift": 1.15,
                    "num_train_timesteps": 1000, "shift": 3.0, "use_dynamic_shifting": True}


@dataclass
class Encoders:
    """What phase 1 needs, as the pipeline registers them: the Qwen2.5-VL text encoder, its tokenizer, the
    Qwen2-VL processor (for its image processor) and the VAE."""

    text_encoder: Any
    tokenizer: Any
    text_processor: Any
    vae: Any
    fingerprint: str | None


def place(model: torch.nn.Module, device, dtype: torch.dtype) -> torch.nn.Module:
    """Move ``model``, casting only when its dtype differs: diffusers warns on every cast of a model whose class
    names modules to keep in float32, even when the list is empty (AutoencoderKL)."""
    if next(model.parameters()).dtype != dtype:
        model.to(dtype=dtype)
    return model.to(device)


def component_folder(source: ModelSource, component: str) -> Path:
    flag = OVERRIDE_FLAGS.get(component)
    override = getattr(source, flag) if flag else None
    if override:
        return Path(override)
    if source.is_tiny:
        how = f"pass --{flag}" if flag else "it has no override flag; pass --model_dir with the official layout"
        raise EditTunerError(f"LongCat-Image-Edit's {component}/ is needed with --model_dir tiny: {how}")
    return Path(source.model_dir) / component


def _overridden(source: ModelSource, components) -> bool:
    return any(getattr(source, OVERRIDE_FLAGS[c]) for c in components if c in OVERRIDE_FLAGS)


def check_model(source: ModelSource, components: tuple[str, ...]) -> None:
    """Refuse a missing model directory or missing files of ``components``, listing them all."""
    if source.is_tiny and not _overridden(source, components):
        return
    if not source.is_tiny and not Path(source.model_dir).is_dir():
        raise EditTunerError(f"--model_dir {source.model_dir}: no such directory; pass a local LongCat-Image-Edit "
                             f"folder ({', '.join(c + '/' for c in COMPONENTS)}) or 'tiny'")
    missing = [m for c in components for m in missing_files(REQUIRED_FILES[c], component_folder(source, c))]
    if missing:
        listing = "\n  ".join(missing)
        raise EditTunerError(f"the LongCat-Image-Edit model directory is incomplete; missing files:\n  {listing}\n"
                             "Copy them from the official release (meituan-longcat/LongCat-Image-Edit), or point "
                             "--<component>_dir at a folder that has them.")
    if "scheduler" in components:
        check_scheduler(component_folder(source, "scheduler"))


def check_scheduler(folder: Path) -> None:
    """The sampler and the training schedule use SCHEDULER_CONFIG: refuse a model whose scheduler differs."""
    config = read_json(folder / "scheduler_config.json")
    differs = {k: config.get(k) for k, v in SCHEDULER_CONFIG.items() if k in config and config[k] != v}
    if config.get("_class_name", "FlowMatchEulerDiscreteScheduler") != "FlowMatchEulerDiscreteScheduler" or differs:
        raise EditTunerError(f"{folder}: a scheduler other than LongCat-Image-Edit's ({config.get('_class_name')}, "
                             f"{differs}); edittuner samples and trains with {SCHEDULER_CONFIG}")


def encoder_fingerprint(source: ModelSource) -> str | None:
    """Identity of everything phase 1 encodes with; None when those folders are not available here."""
    try:
        folders = [component_folder(source, c) for c in ENCODER_COMPONENTS]
    except EditTunerError:
        return None
    if not all(f.is_dir() for f in folders):
        return None
    return "longcat-dir:" + "-".join(hash_folder(f) for f in folders)


def dit_config(source: ModelSource) -> dict:
    check_model(source, ("transformer",))
    return read_json(component_folder(source, "transformer") / "config.json")


def dit_skeleton(config: dict):
    from diffusers import LongCatImageTransformer2DModel

    with torch.device("meta"):
        return LongCatImageTransformer2DModel.from_config(config)


def load_dit(source: ModelSource, dtype: torch.dtype = torch.float32, device="cpu"):
    from diffusers import LongCatImageTransformer2DModel

    components = ("transformer",) if source.is_tiny else ("transformer", "scheduler")
    check_model(source, components)
    folder = component_folder(source, "transformer")
    check_weight_files(weight_files(folder, "diffusion_pytorch_model"))   # diffusers' error would not name the file
    try:
        dit = LongCatImageTransformer2DModel.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, SafetensorError) as exc:
        raise EditTunerError(f"{folder}: cannot load the LongCat-Image transformer ({exc})") from None
    return dit.to(device)


def load_vae(source: ModelSource, dtype: torch.dtype = torch.float32, device="cpu"):
    """The VAE alone: phase 2 decodes its validation previews with it (the text encoder stays unloaded)."""
    from diffusers import AutoencoderKL

    check_model(source, ("vae",))
    folder = component_folder(source, "vae")
    check_weight_files([folder / "diffusion_pytorch_model.safetensors"])
    try:
        vae = AutoencoderKL.from_pretrained(str(folder), torch_dtype=dtype, local_files_only=True)
    except (OSError, ValueError, SafetensorError) as exc:
        raise EditTunerError(f"{folder}: cannot load the VAE ({exc})") from None
    return vae.to(device).eval()


def load_encoders(source: ModelSource, dtype: torch.dtype, device, fingerprint: str | None) -> Encoders:
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer, Qwen2VLProcessor

    check_model(source, ENCODER_COMPONENTS)
    te_folder = component_folder(source, "text_encoder")
    check_weight_files(weight_files(te_folder, "model"))   # transformers' own error would not name the file
    loaders = (("text_encoder", lambda f: Qwen2_5_VLForConditionalGeneration.from_pretrained(
                    f, dtype=dtype, local_files_only=True)),
               # Qwen2Tokenizer: the class the pipeline registers for its tokenizer
               ("tokenizer", lambda f: Qwen2Tokenizer.from_pretrained(f, local_files_only=True)),
               ("text_processor", lambda f: Qwen2VLProcessor.from_pretrained(f, local_files_only=True)))
    loaded = {}
    for component, load in loaders:
        folder = component_folder(source, component)
        try:
            loaded[component] = load(str(folder))
        except (OSError, ValueError, TypeError, SafetensorError) as exc:
            raise EditTunerError(f"{folder}: cannot load LongCat-Image-Edit's {component} ({exc})") from None
    return Encoders(loaded["text_encoder"].to(device).eval(), loaded["tokenizer"], loaded["text_processor"],
                    load_vae(source, dtype, device), fingerprint)
