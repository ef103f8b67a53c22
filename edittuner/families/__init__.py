"""The registered model families and their versions; the one place that knows which models exist.

Adding a family: one module under ``families/`` subclassing ``base.Family``, one line in ``FAMILIES`` below,
its tests (ARCHITECTURE.md has the recipe). Version names are the ``--model_version`` values; they are unique
across families, so a version names its family.
"""

from __future__ import annotations

from ..errors import EditTunerError
from .base import Family, ModelSpec, Preset
from .longcat_image_edit import LongCatImageEdit
from .qwen_image_edit import QwenImageEdit

FAMILIES: dict[str, Family] = {family.name: family for family in (QwenImageEdit(), LongCatImageEdit())}

PRESETS: dict[str, Preset] = {name: preset for family in FAMILIES.values() for name, preset in family.presets.items()}
assert len(PRESETS) == sum(len(f.presets) for f in FAMILIES.values()), "version names must be unique across families"

DEFAULT_FAMILY = next(iter(FAMILIES))   # the first registered
DEFAULT_MODEL_VERSION = FAMILIES[DEFAULT_FAMILY].default_version   # when neither a flag nor a LoRA's metadata names one
VERSIONS = tuple(sorted(PRESETS))


def check_version(version: str, flag: str = "--model_version") -> Preset:
    """The preset of ``version``, or one clear error listing the versions there are."""
    if version not in PRESETS:
        raise EditTunerError(f"{flag} {version}: choose one of {', '.join(VERSIONS)}")
    return PRESETS[version]


def family_of(version: str | None) -> Family:
    """The family a version belongs to (None: the default version's)."""
    return FAMILIES[check_version(version or DEFAULT_MODEL_VERSION).family]


def model_spec(version: str, zero_cond_t: bool | None = None) -> ModelSpec:
    """A version with the run's switches: ``zero_cond_t`` None takes the preset's; on for a family without the
    switch is refused."""
    preset = check_version(version)
    if zero_cond_t and preset.zero_cond_t is None:
        raise EditTunerError(f"--zero_cond_t on: {preset.base_model} has no zero_cond_t; leave the flag out")
    return ModelSpec(FAMILIES[preset.family], preset, bool(preset.zero_cond_t) if zero_cond_t is None else zero_cond_t)


__all__ = ["FAMILIES", "PRESETS", "DEFAULT_MODEL_VERSION", "DEFAULT_FAMILY", "VERSIONS", "Family", "ModelSpec", "Preset",
           "check_version", "family_of", "model_spec"]
