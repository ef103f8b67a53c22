"""Where a model comes from (``ModelSource``), for every family. What a directory must hold and how its parts load
are the family's (``families/<family>/models.py``, over ``weights.py``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import EditTunerError
from .families import DEFAULT_FAMILY


@dataclass(frozen=True)
class ModelSource:
    """Where the model comes from: a directory in the family's official layout (with optional per-component
    overrides, e.g. 2511's DiT with Qwen-Image's text encoder and VAE), or the family's built-in tiny model.
    Checking and loading are the family's (``Family.check_model``, ``load_dit``, ...)."""

    model_dir: str = "tiny"
    tiny_seed: int = 0
    family: str = DEFAULT_FAMILY       # a registered family's name (families.FAMILIES)
    transformer_dir: str | None = None
    text_encoder_dir: str | None = None
    vae_dir: str | None = None
    processor_dir: str | None = None

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

    def load_dit(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.nn.Module:
        return self.model_family.load_dit(self, dtype, device)

    def load_encoders(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu"):
        return self.model_family.load_encoders(self, dtype, device)

    def load_vae(self, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> torch.nn.Module:
        """The VAE alone: phase 2 decodes its validation previews with it (the text encoder stays unloaded)."""
        return self.model_family.load_vae(self, dtype, device)


def model_source_from_args(args, family: str | None = None) -> ModelSource:
    """The model source the CLI's flags name, for ``family`` (default: the family of ``--model_version``, else
    the default version's)."""
    from .families import family_of
    version = getattr(args, "model_version", None)
    return ModelSource(family=family or family_of(version).name, model_dir=args.model_dir, tiny_seed=args.tiny_seed,
                       transformer_dir=getattr(args, "transformer_dir", None),
                       text_encoder_dir=getattr(args, "text_encoder_dir", None),
                       vae_dir=getattr(args, "vae_dir", None), processor_dir=getattr(args, "processor_dir", None))
