"""Where a model comes from (``ModelSource``), for every family. What a directory must hold and how its parts load
are the family's (``families/<family>/models.py``, over ``weights.py``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from .errors import EditTunerError
from .families import DEFAULT_FAMILY
from .options import seed_int

if TYPE_CHECKING:  # torch is imported where a model loads: the CLI's parser reads ModelSource's fields without it
    import torch


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from: a directory in the family's official layout (with optional per-component
    overrides, e.g. 2511's DiT with Qwen-Image's text encoder and VAE), or the family's built-in tiny model.
    Checking and loading are the family's (``Family.check_model``, ``load_dit``, ...)."""

    model_dir: str = field(default="tiny", metadata={
        "help": "local Qwen-Image-Edit folder in the official layout, or 'tiny' for the built-in model"})
    tiny_seed: int = field(default=0, metadata={"type": seed_int,
                                                "help": "seed the tiny model is made from (default 0)"})
    # a registered family's name (families.FAMILIES); the CLI's is that of --model_version
    family: str = field(default=DEFAULT_FAMILY, metadata={"cli": False})
    transformer_dir: str | None = field(default=None, metadata={
        "help": "override the transformer/ folder (e.g. Qwen-Image's transformer with 2511's DiT)"})
    text_encoder_dir: str | None = field(default=None, metadata={
        "help": "override the text_encoder/ folder (e.g. Qwen-Image's text_encoder with 2511's DiT)"})
    vae_dir: str | None = field(default=None, metadata={
        "help": "override the vae/ folder (e.g. Qwen-Image's vae with 2511's DiT)"})
    processor_dir: str | None = field(default=None, metadata={
        "help": "override the processor/ folder (e.g. Qwen-Image's processor with 2511's DiT)"})

    @property
    def is_tiny(self) -> bool:
        return self.model_dir == "tiny"

    @property
    def uses_tiny_encoders(self) -> bool:
        return self.is_tiny and not any((self.text_encoder_dir, self.vae_dir, self.processor_dir))

    def folder(self, component: str) -> Path:
        override = getattr(self, f"{component}_dir")
        if override:
            return Path(override)
        if self.is_tiny:
            raise EditTunerError(f"--{component}_dir is needed when --model_dir is tiny")
        return Path(self.model_dir) / component

    def describe(self) -> str:
        return f"built-in tiny model (seed {self.tiny_seed})" if self.is_tiny else f"model directory {self.model_dir}"

    @property
    def model_family(self):
        from .families import FAMILIES
        return FAMILIES[self.family]

    def check(self, components: tuple[str, ...]) -> None:
        """Refuse a missing or incomplete model directory for ``components``, listing what is missing."""
        self.model_family.check_model(self, components)

    def encoder_fingerprint(self) -> str | None:
        """Identity of everything phase 1 encodes with; None when those folders are not available here."""
        return self.model_family.encoder_fingerprint(self)

    def load_dit(self, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
        return self.model_family.load_dit(self, _float32_unless(dtype), device)

    def load_encoders(self, dtype: torch.dtype | None = None, device: str | torch.device = "cpu"):
        return self.model_family.load_encoders(self, _float32_unless(dtype), device)

    def load_vae(self, dtype: torch.dtype | None = None, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The VAE alone: phase 2 decodes its validation previews with it (the text encoder stays unloaded)."""
        return self.model_family.load_vae(self, _float32_unless(dtype), device)


def _float32_unless(dtype: torch.dtype | None) -> torch.dtype:
    import torch
    return torch.float32 if dtype is None else dtype
