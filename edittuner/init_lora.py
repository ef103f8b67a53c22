"""`--init_lora FILE`: phase 2 starts from an existing LoRA (ours, or a comfyui / diffusers layout that
``lora.py`` reads), e.g. LBM fine-tuning from an SFT result.

Two checks, cheapest first. ``inspect_init_lora`` reads the file's header only (metadata and tensor shapes, no
weights), so `--dry_run` and the launchers' `edittuner check` refuse a wrong model version / family, rank or
recorded target list before phase 1. ``load_init_lora`` then reads the weights into the freshly injected adapters
and refuses any layer that the run's targets select and the file lacks, or the reverse. It runs before the runtime
wraps the model: DDP then starts every rank from these values, and ZeRO-3 partitions them. The optimizer starts
fresh, and ``--resume`` wins over ``--init_lora`` (the checkpoint already holds the weights).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .configs import TrainConfig
from .errors import EditTunerError
from .families import FAMILIES, PRESETS
from .lora import _split_key, load_lora_and_metadata, lora_parameters

SHOWN = 3   # layers named in a mismatch message


@dataclass(frozen=True)
class InitLora:
    """What the header says: the file, its rank, the version it records (None: a foreign file records none)."""

    path: Path
    rank: int
    version: str | None
    targets: tuple[str, ...] | None


def _flag(cfg: TrainConfig) -> str:
    return f"--init_lora {cfg.init_lora}"


def _header(path: Path) -> tuple[dict[str, str], dict[str, list[int]]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {}), {k: list(f.get_slice(k).get_shape()) for k in f.keys()}
    except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
        raise EditTunerError(f"{path}: not a readable LoRA safetensors file ({exc}); name the lora.safetensors of a "
                             "finished run (or one of its checkpoints/step-N/lora.safetensors)") from None


def _recorded_version(metadata: dict[str, str], cfg: TrainConfig) -> str | None:
    """The version the file's metadata records (our trainer writes family and base_model), refused when it is not
    the run's; None for a file that records no base model we know (diffusers' or another trainer's)."""
    base_model, family = metadata.get("base_model"), metadata.get("family")
    run = cfg.spec.preset
    if family is not None and family != run.family:
        raise EditTunerError(f"{_flag(cfg)}: this LoRA was trained for the {family} family ({base_model}), but this "
                             f"run trains {run.base_model} (the {run.family} family); start from a {run.family} LoRA, "
                             "or train the model the LoRA was made for")
    version = next((name for name, preset in PRESETS.items() if preset.base_model == base_model), None)
    if version is None:
        known = [f for f in FAMILIES.values() if str(base_model).startswith(f.base_model_prefix)]
        if known:
            raise EditTunerError(f"{_flag(cfg)}: its metadata says base_model {base_model!r}, a version this "
                                 f"edittuner does not know; this run trains {run.base_model}")
        return None
    if version != cfg.model_version:
        raise EditTunerError(f"{_flag(cfg)}: this LoRA was trained for {base_model} (--model_version {version}), but "
                             f"this run trains {run.base_model} (--model_version {cfg.model_version}); pass "
                             f"--model_version {version} to match, or start from a {run.base_model} LoRA")
    return version


def _recorded_targets(metadata: dict[str, str], cfg: TrainConfig) -> tuple[str, ...] | None:
    try:
        targets = json.loads(metadata["target_modules"]) if "target_modules" in metadata else None
    except ValueError:
        targets = None
    if not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
        return None
    if set(targets) != set(cfg.lora_targets):
        raise EditTunerError(f"{_flag(cfg)}: this LoRA targets {','.join(targets)}, but this run targets "
                             f"{','.join(cfg.lora_targets)}; pass --lora_targets {','.join(targets)} to match")
    return tuple(targets)


def inspect_init_lora(cfg: TrainConfig) -> InitLora:
    """The header checks: readable, a LoRA, the run's model version, rank and (when it records them) targets."""
    path = Path(cfg.init_lora)
    if not path.is_file():
        raise EditTunerError(f"{_flag(cfg)}: no such file; name a LoRA file (e.g. train/<run>/lora.safetensors)")
    metadata, shapes = _header(path)
    ranks = {}
    for key, shape in shapes.items():
        split = _split_key(key)
        if split is not None and split[1] == "lora_A" and len(shape) == 2:
            ranks.setdefault(shape[0], split[0])
    if not ranks:
        raise EditTunerError(f"{_flag(cfg)}: not a LoRA file (no lora_A / lora_B weights)")
    version = _recorded_version(metadata, cfg)
    if len(ranks) > 1:
        raise EditTunerError(f"{_flag(cfg)}: its layers have ranks {sorted(ranks)} (e.g. {ranks[max(ranks)]} is "
                             f"{max(ranks)}); a run trains one --rank, so start from a LoRA of a single rank")
    rank = next(iter(ranks))
    if rank != cfg.rank:
        raise EditTunerError(f"{_flag(cfg)}: this LoRA has rank {rank}, but this run trains --rank {cfg.rank}; pass "
                             f"--rank {rank} to match")
    return InitLora(path, rank, version, _recorded_targets(metadata, cfg))


def load_init_lora(dit: torch.nn.Module, cfg: TrainConfig) -> InitLora:
    """Check the file against the run (header, then layer by layer) and copy its weights into the adapters."""
    info = inspect_init_lora(cfg)
    state = load_lora_and_metadata(info.path)[0]   # canonical: bare module names, whole scale in lora_B
    params = dict(lora_parameters(dit))
    run = {name.replace(".default.weight", ".weight") for name in params}
    missing, extra = sorted(run - state.keys()), sorted(state.keys() - run)
    if missing or extra:
        modules = lambda keys: sorted({k.rsplit(".lora_", 1)[0] for k in keys})   # noqa: E731
        parts = []
        if missing:
            parts.append(f"{len(modules(missing))} layer(s) this run trains are not in it (e.g. "
                         f"{', '.join(modules(missing)[:SHOWN])})")
        if extra:
            parts.append(f"it has {len(modules(extra))} layer(s) this run does not train (e.g. "
                         f"{', '.join(modules(extra)[:SHOWN])})")
        raise EditTunerError(f"{_flag(cfg)}: its layers differ from this run's --lora_targets "
                             f"{','.join(cfg.lora_targets)}: {'; '.join(parts)}. Pass the --lora_targets it was "
                             "trained with, or start from a LoRA of this model and targets")
    scale = cfg.alpha / cfg.rank   # the file holds alpha/rank folded into lora_B; the adapter applies the run's
    with torch.no_grad():
        for name, param in params.items():
            value = state[name.replace(".default.weight", ".weight")]
            if value.shape != param.shape:
                raise EditTunerError(f"{_flag(cfg)}: {name.removesuffix('.default.weight')} is {tuple(value.shape)} "
                                     f"in the file but {tuple(param.shape)} in this model; it was trained on another "
                                     "model size")
            param.copy_((value / scale if ".lora_B." in name else value).to(param.dtype))
    return info
