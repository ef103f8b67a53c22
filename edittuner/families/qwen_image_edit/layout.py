"""Qwen-Image-Edit's official model folder: what it must hold, and the identity of its encoders. Light (no engine
import), so the launchers' check refuses a bad folder in a fraction of a second."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ...errors import EditTunerError
from ...weights import hash_folder, missing_files

if TYPE_CHECKING:
    from ...models import ModelSource

# The official layout: transformer/, text_encoder/, vae/, processor/ (tokenizer/ is optional for editing).
REQUIRED_FILES = {
    "transformer": ["config.json", ("diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.safetensors")],
    "text_encoder": ["config.json", ("model.safetensors.index.json", "model.safetensors")],
    "vae": ["config.json", "diffusion_pytorch_model.safetensors"],
    "processor": [("preprocessor_config.json", "processor_config.json"), ("tokenizer.json", "vocab.json")],
}


def check_model(source: ModelSource, components: tuple[str, ...]) -> None:
    """Refuse a missing model directory or missing files of ``components``, listing them all."""
    if source.is_tiny and not any(getattr(source, f"{c}_dir") for c in components):
        return
    if not source.is_tiny and not Path(source.model_dir).is_dir():
        raise EditTunerError(f"--model_dir {source.model_dir}: no such directory; pass a local Qwen-Image-Edit "
                             "folder (transformer/, text_encoder/, vae/, processor/) or 'tiny'")
    missing = [m for c in components for m in missing_files(REQUIRED_FILES[c], source.folder(c))]
    if missing:
        listing = "\n  ".join(missing)
        raise EditTunerError(f"the model directory is incomplete; missing files:\n  {listing}\n"
                             "Copy them from the official release, or point --<component>_dir at a folder that has them.")


def encoder_fingerprint(source: ModelSource) -> str | None:
    """Identity of everything phase 1 encodes with; None when those folders are not available here."""
    try:
        folders = [source.folder(c) for c in ("text_encoder", "vae", "processor")]
    except EditTunerError:
        return None
    if not all(f.is_dir() for f in folders):
        return None
    return "dir:" + "-".join(hash_folder(f) for f in folders)
