"""LoRA on the DiT: presets, injection (peft), and the file format diffsynth's ``pipe.load_lora`` reads.

File format: ``<module>.lora_A.weight`` (r, in) and ``<module>.lora_B.weight`` (out, r) with module names
as in the DiT state dict; the alpha/rank scale is folded into lora_B so W' = W + B @ A with no alpha key.
Rank, alpha, targets and the base model version are in the safetensors metadata.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from .atomic import atomic_path
from .errors import EditTunerError

BASE_TARGETS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1")


@dataclass(frozen=True)
class Preset:
    """What a model version trains by default."""

    name: str
    lora_targets: tuple[str, ...]
    zero_cond_t: bool
    gradient_accumulation: int


PRESETS = {
    "2509": Preset("2509", BASE_TARGETS, zero_cond_t=False, gradient_accumulation=1),
    "2511": Preset("2511", BASE_TARGETS + ("img_in", "txt_in", "proj_out"), zero_cond_t=True,
                   gradient_accumulation=16),
}

# In the last block the text stream's outputs are thrown away (only image tokens reach proj_out). The text
# queries only make text outputs, so add_q_proj is a dead end there too (text keys and values still reach the
# image through attention). LoRA on these would get no gradient and force DDP's find_unused_parameters.
DEAD_END_IN_LAST_BLOCK = ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.2")


def lora_module_names(dit: torch.nn.Module, targets: tuple[str, ...]) -> list[str]:
    """Full names of the Linear layers a target list selects, minus those whose output never reaches the loss."""
    last = len(dit.transformer_blocks) - 1
    dead = {f"transformer_blocks.{last}.{name}" for name in DEAD_END_IN_LAST_BLOCK}
    names = []
    for name, module in dit.named_modules():
        if not isinstance(module, torch.nn.Linear):
            continue
        if any(name == t or name.endswith("." + t) for t in targets) and name not in dead:
            names.append(name)
    unmatched = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unmatched:
        raise EditTunerError(f"--lora_targets: {unmatched} match no Linear layer of the DiT")
    return names


def inject_lora(dit: torch.nn.Module, targets: tuple[str, ...], rank: int, alpha: float) -> list[str]:
    """Freeze the DiT and add trainable fp32 LoRA adapters to the selected layers."""
    from peft import LoraConfig, inject_adapter_in_model

    names = lora_module_names(dit, targets)
    dit.requires_grad_(False)
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=names), dit)
    for name, param in dit.named_parameters():
        if ".lora_" in name:
            param.requires_grad_(True)
            param.data = param.data.float()
    return names


def lora_parameters(dit: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    return [(n, p) for n, p in dit.named_parameters() if ".lora_A." in n or ".lora_B." in n]


def lora_state_dict(dit: torch.nn.Module, rank: int, alpha: float) -> dict[str, torch.Tensor]:
    """The adapters in file format (scale folded into lora_B)."""
    scale = alpha / rank
    state = {}
    for name, param in lora_parameters(dit):
        key = name.replace(".default.weight", ".weight")
        value = param.detach().float().cpu()
        state[key] = (value * scale if ".lora_B." in key else value).contiguous()
    return state


def save_lora(path: str | os.PathLike, state: dict[str, torch.Tensor], metadata: dict) -> None:
    with atomic_path(path) as tmp:
        save_file(state, str(tmp), metadata={k: (v if isinstance(v, str) else json.dumps(v)) for k, v in metadata.items()})


def load_lora_file(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (OSError, RuntimeError, ValueError) as exc:
        raise EditTunerError(f"{path}: not a readable LoRA safetensors file ({exc})") from None


def set_lora_state(dit: torch.nn.Module, state: dict[str, torch.Tensor], rank: int, alpha: float) -> None:
    """Inverse of lora_state_dict, for resuming into freshly injected adapters."""
    scale = alpha / rank
    params = dict(lora_parameters(dit))
    for name, param in params.items():
        key = name.replace(".default.weight", ".weight")
        if key not in state:
            raise EditTunerError(f"LoRA file lacks {key}; it was trained with other targets or another model")
        value = state[key] / scale if ".lora_B." in key else state[key]
        param.data.copy_(value.to(param.dtype))
