"""LoRA on the DiT: injection (peft), and the LoRA file formats. Which layers a version targets is its
family's (``families``: presets and the dead-end rule).

Our file (format "diffsynth", what training writes): ``diffusion_model.<module>.lora_A.weight`` (r, in) and
``diffusion_model.<module>.lora_B.weight`` (out, r), module names as in the DiT state dict, no ``.alpha`` keys:
the scale alpha/rank is folded into lora_B, so W' = W + B @ A. This one layout loads unconverted in diffsynth
(``pipe.load_lora``: its loader drops ``diffusion_model.``), diffusers (``load_lora_weights``: the Qwen-Image
loader maps ``diffusion_model.`` to ``transformer.``) and ComfyUI. Metadata: rank, alpha (the training alpha;
alpha/rank is the scale already folded into lora_B, so a loader applies none: ``alpha_folded_into_lora_B``),
base_model, target_modules, zero_cond_t.

Other formats (``export_lora``): "diffusers" = ``transformer.<module>.lora_A/B.weight``, folded, as diffusers'
own writer lays it out; "comfyui" = ``diffusion_model.<module>.lora_A/B.weight`` plus a scalar
``diffusion_model.<module>.alpha`` with lora_B unfolded (B_file = B * rank / alpha), the same delta.
Reading accepts all three and the bare ``<module>.lora_A.weight`` layout of older files. In memory, code works on
the "canonical" form: bare module names, scale folded into lora_B. Every reader (sampling, the app, resume,
export) refuses a file with NaN or infinite weights, a non-2-D, empty or rank-mismatched lora_A/lora_B, or an
alpha (tensor, metadata or peft ``lora_alpha``) that is not one finite number above 0, naming the file and key.
"""

from __future__ import annotations

import json
import math
import os
import re
import warnings

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .atomic import atomic_path, check_output_file
from .errors import EditTunerError
from .families import FAMILIES, family_of


def lora_module_names(dit: torch.nn.Module, targets: tuple[str, ...], family=None) -> list[str]:
    """Full names of the Linear layers a target list selects, minus those whose output never reaches the loss
    (the ``family``'s rule; default: the default version's family)."""
    names = (family or family_of(None)).lora_module_names(dit, targets)
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise EditTunerError(f"--lora_targets: {unmatched} match no Linear layer of the DiT; its layers inside a "
                             f"block are named {', '.join(_block_linear_names(dit))}")
    return names


def _block_linear_names(dit: torch.nn.Module) -> list[str]:
    """The DiT's Linear layer names with the block prefix ("transformer_blocks.7.") cut: what a target can be."""
    return sorted({re.sub(r"^.*?\.\d+\.", "", name) for name, module in dit.named_modules()
                   if isinstance(module, torch.nn.Linear) and re.match(r"^.*?\.\d+\.", name)})


def inject_lora(dit: torch.nn.Module, targets: tuple[str, ...], rank: int, alpha: float, family=None) -> list[str]:
    """Freeze the DiT and add trainable fp32 LoRA adapters to the layers ``family`` selects for ``targets``."""
    from peft import LoraConfig, inject_adapter_in_model

    names = lora_module_names(dit, targets, family)
    dit.requires_grad_(False)
    with warnings.catch_warnings():
        # On an int8/fp8 base peft warns that merge() will not work; we never merge a training adapter.
        warnings.filterwarnings("ignore", message="TorchaoLoraLinear")
        inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=names), dit)
    for name, param in dit.named_parameters():
        if ".lora_" in name:
            param.requires_grad_(True)
            param.data = param.data.float()
    return names


def lora_parameters(dit: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in dit.named_parameters() if ".lora_A." in n or ".lora_B." in n]


NATIVE_FORMAT = "diffsynth"
FORMATS = ("diffsynth", "comfyui", "diffusers")
_PREFIX = {"diffsynth": "diffusion_model.", "comfyui": "diffusion_model.", "diffusers": "transformer."}
_A, _B, _ALPHA = ".lora_A.weight", ".lora_B.weight", ".alpha"


def lora_state_dict(dit: torch.nn.Module, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """The adapters in our file format (scale folded into lora_B)."""
    return lora_file_state(lora_parameters(dit), rank, alpha)


def lora_file_state(named, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """(peft parameter name, tensor) pairs in our file format: the model's adapters or their EMA."""
    scale = alpha / rank
    state = {}
    for name, param in named:
        key = name.replace(".default.weight", ".weight")
        value = param.detach().float().cpu()
        state[key] = (value * scale if ".lora_B." in key else value).contiguous()
    return to_format(state, NATIVE_FORMAT)


def set_lora_state(dit: torch.nn.Module, state: dict[str, torch.Tensor], rank: int, alpha: float) -> None:
    """Inverse of lora_state_dict, for resuming into freshly injected adapters; takes any format we read."""
    state = canonical_lora(state)
    scale = alpha / rank
    params = dict(lora_parameters(dit))
    for name, param in params.items():
        key = name.replace(".default.weight", ".weight")
        if key not in state:
            raise EditTunerError(f"LoRA file lacks {key}; it was trained with other targets or another model")
        value = state[key] / scale if ".lora_B." in key else state[key]
        param.data.copy_(value.to(param.dtype))


def save_lora(path: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict) -> None:
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()})


def _alpha_value(value, where: str) -> float:
    """An alpha read from a file (metadata text, JSON value or a tensor's number): finite and above 0, or an error."""
    try:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise TypeError
        alpha = float(value)
    except (TypeError, ValueError):
        raise EditTunerError(f"{where} is {value!r}, not a number; set it to the alpha the LoRA was trained with "
                             "(often its rank) or remove it") from None
    if not math.isfinite(alpha) or alpha <= 0:
        raise EditTunerError(f"{where} is {value!r}; an alpha must be a finite number above 0; set it to the alpha "
                             "the LoRA was trained with (often its rank) or remove it")
    return alpha


def _check_finite(state: dict[str, torch.Tensor], source) -> None:
    """Refuse NaN or infinite weights: they would sample black images and train nothing."""
    for key, value in state.items():
        if value.is_floating_point() and not bool(torch.isfinite(value.float()).all()):
            bad = int((~torch.isfinite(value.float())).sum())
            raise EditTunerError(f"{source}: {key} holds {bad} NaN or infinite value(s) of {value.numel()}; the file "
                                 "is broken: re-export it, or use an earlier checkpoint of the run")


def read_lora_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and the metadata of a safetensors file, as stored; every reader of a LoRA goes through here, so
    this refuses NaN or infinite weights and an ``alpha`` metadata entry that is not a finite number above 0."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = dict(f.metadata() or {})
        state = load_file(str(path))
    except (OSError, RuntimeError, ValueError, SafetensorError) as exc:
        raise EditTunerError(f"{path}: not a readable LoRA safetensors file ({exc})") from None
    _check_finite(state, path)
    if "alpha" in metadata:
        _alpha_value(metadata["alpha"], f"{path}: metadata \"alpha\"")
    return state, metadata


def load_lora_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """A LoRA file of any format we read, in canonical form (bare module names, scale folded into lora_B)."""
    return load_lora_and_metadata(path)[0]


def load_lora_and_metadata(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``load_lora_file`` and the file's metadata, from one read."""
    state, metadata = read_lora_file(path)
    return canonical_lora(state, peft_scale=_peft_alpha(metadata, path), source=str(path)), metadata


def check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise EditTunerError(f"unknown LoRA format {fmt!r}; use one of {', '.join(FORMATS)}")


def detect_format(state: dict[str, torch.Tensor], source: str = "LoRA") -> str:
    """Which of FORMATS a state dict is in, from its keys (bare keys of older files count as ours)."""
    if not any(k.endswith((_A, _B)) for k in state):
        raise EditTunerError(f"{source}: not a LoRA file: no lora_A/lora_B weights (keys look like {sorted(state)[:2]})")
    if any(k.endswith(_ALPHA) for k in state):
        return "comfyui"
    if all(k.startswith(_PREFIX["diffusers"]) for k in state):
        return "diffusers"
    return "diffsynth"


def _split_key(key: str) -> tuple[str, str] | None:
    """``[prefix.]<module>.lora_A.weight`` -> (module, "lora_A"); likewise lora_B and alpha; None for other keys."""
    for prefix in ("diffusion_model.", "transformer."):
        if key.startswith(prefix):
            key = key[len(prefix):]
            break
    for suffix, part in ((_A, "lora_A"), (_B, "lora_B"), (_ALPHA, "alpha")):
        if key.endswith(suffix):
            return key[:-len(suffix)], part
    return None


def canonical_lora(state: dict[str, torch.Tensor], peft_scale: float | None = None,
                   source: str = "LoRA") -> dict[str, torch.Tensor]:
    """Any format we read -> ``<module>.lora_A.weight`` / ``.lora_B.weight`` with the whole scale in lora_B.

    ``.alpha`` tensors fold in as alpha / rank; ``peft_scale`` is a peft lora_alpha from diffusers' metadata,
    folded in as lora_alpha / rank for files that have no ``.alpha`` tensors."""
    detect_format(state, source)
    modules: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, value in state.items():
        split = _split_key(key)
        if split is None:
            raise EditTunerError(f"{source}: {key} is not a LoRA tensor (expected only lora_A, lora_B and alpha)")
        modules.setdefault(split[0], {})[split[1]] = (key, value)
    out = {}
    for name, parts in sorted(modules.items()):
        if "lora_A" not in parts or "lora_B" not in parts:
            raise EditTunerError(f"{source}: {name} lacks {'lora_B' if 'lora_A' in parts else 'lora_A'}; "
                                 "the file is incomplete")
        down, up = _checked_pair(parts["lora_A"], parts["lora_B"], source)
        alpha = _layer_alpha(parts["alpha"], source) if "alpha" in parts else peft_scale
        scale = 1.0 if alpha is None else alpha / down.shape[0]
        out[name + _A] = down
        out[name + _B] = up if scale == 1.0 else up * scale
        if scale != 1.0 and not bool(torch.isfinite(out[name + _B]).all()):
            raise EditTunerError(f"{source}: {parts['lora_B'][0]} overflows once scaled by alpha / rank = {scale:g}; "
                                 "the alpha is wrong: fix it or remove it")
    return out


def _checked_pair(down: tuple[str, torch.Tensor], up: tuple[str, torch.Tensor],
                  source) -> tuple[torch.Tensor, torch.Tensor]:
    """lora_A (rank, in) and lora_B (out, rank) of one layer: 2-D, not empty, the same rank."""
    for key, value in (down, up):
        if value.ndim != 2 or 0 in value.shape:
            raise EditTunerError(f"{source}: {key} has shape {tuple(value.shape)}; LoRA weights are non-empty 2-D "
                                 "matrices (lora_A: rank x in, lora_B: out x rank); the file is broken")
    if down[1].shape[0] != up[1].shape[1]:
        raise EditTunerError(f"{source}: {down[0]} {tuple(down[1].shape)} and {up[0]} {tuple(up[1].shape)} disagree on "
                             "the rank (lora_A's rows must equal lora_B's columns); the file is broken")
    return down[1], up[1]


def _layer_alpha(alpha: tuple[str, torch.Tensor], source) -> float:
    key, value = alpha
    if value.numel() != 1:
        raise EditTunerError(f"{source}: {key} holds {value.numel()} values of shape {tuple(value.shape)}; a layer's "
                             "alpha is one number; fix the file")
    return _alpha_value(value.item(), f"{source}: {key}")


def to_format(canonical: dict[str, torch.Tensor], fmt: str, alpha: float | None = None) -> dict[str, torch.Tensor]:
    """Canonical -> a file layout of FORMATS. For comfyui, ``alpha`` (default: rank) is written per layer and
    lora_B divided by alpha / rank, so that alpha / rank * B @ A is the same delta."""
    check_format(fmt)
    prefix = _PREFIX[fmt]
    out = {}
    for key, value in canonical.items():
        out[prefix + key] = value
        if fmt == "comfyui" and key.endswith(_B):
            name = key[:-len(_B)]
            rank = canonical[name + _A].shape[0]
            layer_alpha = float(rank) if alpha is None else float(alpha)
            out[prefix + key] = (value * (rank / layer_alpha)).contiguous()
            out[prefix + name + _ALPHA] = torch.tensor(layer_alpha)
    return out


def _peft_alpha(metadata: dict[str, str], source) -> float | None:
    """lora_alpha from diffusers' ``lora_adapter_metadata`` (peft scales by lora_alpha / r on load)."""
    if "lora_adapter_metadata" not in metadata:
        return None
    try:
        config = json.loads(metadata["lora_adapter_metadata"])
    except (ValueError, RecursionError):
        raise EditTunerError(f"{source}: metadata \"lora_adapter_metadata\" is not valid JSON; "
                             "fix or remove it") from None
    if not isinstance(config, dict):
        raise EditTunerError(f"{source}: metadata \"lora_adapter_metadata\" is a JSON {type(config).__name__}, not an "
                             "object like {\"r\": 16, \"lora_alpha\": 16}; fix or remove it")
    config = {str(k).removeprefix("transformer."): v for k, v in config.items()}
    if config.get("alpha_pattern") or config.get("use_rslora"):
        raise EditTunerError(f"{source}: per-layer alpha_pattern / use_rslora in lora_adapter_metadata is not supported")
    if config.get("lora_alpha") is None:
        return None
    return _alpha_value(config["lora_alpha"], f"{source}: lora_adapter_metadata \"lora_alpha\"")


def _training_alpha(state: dict[str, torch.Tensor], metadata: dict[str, str]) -> float | None:
    """The alpha a file was trained with: from our metadata (``read_lora_file`` checked it), else from its
    ``.alpha`` tensors if they agree."""
    if "alpha" in metadata:
        return float(metadata["alpha"])
    alphas = {float(v.item()) for k, v in state.items() if k.endswith(_ALPHA)}
    return alphas.pop() if len(alphas) == 1 else None


def export_lora(source: str | os.PathLike, output: str | os.PathLike, fmt: str) -> str:
    """Convert a LoRA file of any format we read into ``fmt``; returns the input's detected format.

    Metadata is carried over, with format, rank, alpha and alpha_folded_into_lora_B set to describe the output
    (diffusers' peft metadata is dropped: its scale is folded into the tensors)."""
    check_format(fmt)
    check_output_file(output, "--output")
    state, metadata = read_lora_file(source)
    family = FAMILIES.get(metadata.get("family", ""))
    if family is not None and fmt not in family.lora_layouts:
        raise EditTunerError(f"--format {fmt}: {source} is a {family.name} LoRA, which is written in "
                             f"{', '.join(family.lora_layouts)} only")
    source_format = detect_format(state, str(source))
    canonical = canonical_lora(state, peft_scale=_peft_alpha(metadata, source), source=str(source))
    rank = max(v.shape[0] for k, v in canonical.items() if k.endswith(_A))
    alpha = _training_alpha(state, metadata)
    metadata.pop("lora_adapter_metadata", None)
    metadata.update({"format": fmt, "rank": metadata.get("rank", str(rank)),
                     "alpha": str(alpha if alpha is not None else float(rank)),
                     "alpha_folded_into_lora_B": "false" if fmt == "comfyui" else "true"})
    try:
        save_lora(output, to_format(canonical, fmt, alpha), metadata)
    except OSError as exc:
        raise EditTunerError(f"--output {output}: writing failed ({exc.strerror or exc}); nothing was written there; "
                             "free some space or choose another folder") from None
    return source_format
