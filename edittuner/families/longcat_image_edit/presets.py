"""LongCat-Image-Edit's version: its preset and which Linear layers a LoRA target list selects."""

from __future__ import annotations

from ..base import Preset

NAME = "longcat-image-edit"
VERSION = "longcat"
# The one way the pipeline builds its prompt: the edit system prompt, the reference as vision context, the
# instruction padded to 512 tokens (LongCatImageEditPipeline._encode_prompt). Part of the cache identity.
PROMPT_TEMPLATE = "longcat-edit"

# The attention and feed-forward projections of both block kinds, by their diffusers module names
# (transformer_longcat_image.py). The first twelve are LongCat-Image's own edit-LoRA example's targets; they also
# catch the single-stream blocks' attn.to_q/k/v. proj_mlp and proj_out add the single-stream blocks' feed-forward
# (proj_out there maps [attention, MLP] back to the model width); "proj_out" also selects the final projection.
LORA_TARGETS = ("attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0", "attn.add_q_proj", "attn.add_k_proj",
                "attn.add_v_proj", "attn.to_add_out", "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj",
                "ff_context.net.2", "proj_mlp", "proj_out")

PRESETS = {
    # The edit pipeline takes exactly one input image; no zero_cond_t switch. Accumulation 1 as LongCat's example.
    VERSION: Preset(NAME, VERSION, "LongCat-Image-Edit", LORA_TARGETS, 1, zero_cond_t=None, max_references=1,
                    prompt_template=PROMPT_TEMPLATE),
}


def selects_module(name: str, targets: tuple[str, ...]) -> bool:
    """Whether a Linear layer's full name gets a LoRA. No dead ends to leave out: the text stream's outputs of the
    double-stream blocks feed the single-stream blocks, whose layers serve text and image tokens alike."""
    return any(name == t or name.endswith("." + t) for t in targets)
