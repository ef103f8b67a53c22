"""Qwen-Image-Edit's versions: presets, the LoRA dead-end rule, the prompt template of unnamed cache records."""

from __future__ import annotations

from ..base import Preset

NAME = "qwen-image-edit"
# Samples cached before their records named the prompt template were all encoded with this one; also the template
# when none is named.
UNNAMED_PROMPT_TEMPLATE = "multi"
BASE_TARGETS = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out",
                "img_mlp.net.2", "img_mod.1", "txt_mlp.net.2", "txt_mod.1")


def _preset(version: str, targets: tuple[str, ...], zero_cond_t: bool, accumulation: int, **inputs) -> Preset:
    return Preset(NAME, version, f"Qwen-Image-Edit-{version}", targets, accumulation, zero_cond_t, **inputs)


PRESETS = {
    # The original Qwen-Image-Edit (August 2025): one reference, the engine's single-image prompt template; LoRA
    # targets as DiffSynth-Studio's Qwen-Image-Edit LoRA example.
    "2508": _preset("2508", BASE_TARGETS, False, 1, max_references=1, prompt_template="single"),
    "2509": _preset("2509", BASE_TARGETS, False, 1),
    "2511": _preset("2511", BASE_TARGETS + ("img_in", "txt_in", "proj_out"), True, 16),
}

# In the last block the text stream's outputs are thrown away (only image tokens reach proj_out). The text
# queries only make text outputs, so add_q_proj is a dead end there too (text keys and values still reach the
# image through attention). LoRA on these would get no gradient and force DDP's find_unused_parameters.
DEAD_END_IN_LAST_BLOCK = ("attn.add_q_proj", "attn.to_add_out", "txt_mlp.net.2")


def selects_module(name: str, targets: tuple[str, ...], num_blocks: int) -> bool:
    """Whether a Linear layer's full name gets a LoRA: it matches a target and is not a dead end of the last
    block (the rule lora_module_names applies, and benchmarks/flops.py counts)."""
    if name.startswith(f"transformer_blocks.{num_blocks - 1}.") and \
            name.split(".", 2)[2] in DEAD_END_IN_LAST_BLOCK:
        return False
    return any(name == t or name.endswith("." + t) for t in targets)
