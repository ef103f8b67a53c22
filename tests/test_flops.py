"""benchmarks/flops.py against an independent count: torch.utils.flop_counter.FlopCounterMode on EditDiTs
with LoRA injected, run through DiTDenoiser (the engine's model_fn_qwen_image) as training runs them.

Attention: on CPU, SDPA without a mask runs ``aten._scaled_dot_product_flash_attention_for_cpu``, which
FlopCounterMode has no formula for (it knows the CUDA flash / memory-efficient / cuDNN kernels): left alone it
counts no attention FLOPs at all. So attention runs two ways here:
  * "math": forced onto SDPA's math backend, plain bmm's that FlopCounterMode counts; its backward is the
    bmm's own backward (dP, dV, dQ, dK: 2x forward), the analytic count with fused_attention=False;
  * "fused": the CPU flash kernel with FlopCounterMode's formulas for the CUDA fused kernels mapped onto it;
    their backward formula includes the QK^T recompute (fused_attention=True, part of hardware_flops only).
The analytic counts agree exactly (to the FLOP), so the tests ask for equality.
"""

import contextlib
import dataclasses

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

from benchmarks.flops import (DiTShape, dit_forward_flops, edit_prompt_tokens, forward_breakdown,
                              lora_training_step_flops, mfu, peak_tflops_for, real_2511_shape)
from edittuner.families import PRESETS
from edittuner.lora import inject_lora
from edittuner.families.qwen_image_edit.models import EditDiT
from edittuner.families.qwen_image_edit.denoiser import collate_conditioning
from edittuner.families.qwen_image_edit.denoiser import DiTDenoiser
from edittuner.families.qwen_image_edit.tiny import TINY_TEXT_DIM

RANK = 4
TEXT_TOKENS = 20
TARGET_HW = (8, 12)  # latent size: 4 x 6 = 24 image tokens after 2x2 packing


def _cpu_flash(query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_flop_count(query, key, value)


def _cpu_flash_backward(grad_out, query, key, value, *args, out_shape=None, **kwargs):
    return sdpa_backward_flop_count(grad_out, query, key, value)


CPU_FLASH_FORMULAS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash,
                      torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward}


@contextlib.contextmanager
def counting(attention: str):
    """FlopCounterMode with attention counted ("math" backend, or the fused CPU kernel with formulas)."""
    if attention == "math":
        with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
            yield counter
    else:
        with FlopCounterMode(display=False, custom_mapping=CPU_FLASH_FORMULAS) as counter:
            yield counter


# (preset, reference latent sizes): 2511 with one reference (zero_cond_t, img_in/txt_in/proj_out adapted);
# 2509 with two references of different sizes (no zero_cond_t, the streams need no grad until block 0's LoRA).
CASES = [("2511", [(6, 6)]), ("2509", [(8, 12), (4, 6)])]


def make_case(preset_name: str, refs, layers: int = 3):
    preset = PRESETS[preset_name]
    torch.manual_seed(0)
    dit = EditDiT(num_layers=layers, attention_head_dim=32, num_attention_heads=2,
                  joint_attention_dim=TINY_TEXT_DIM, axes_dims_rope=(8, 12, 12))
    inject_lora(dit, preset.lora_targets, rank=RANK, alpha=RANK)
    sample = {"target": torch.randn(16, *TARGET_HW), "prompt_emb": torch.randn(TEXT_TOKENS, TINY_TEXT_DIM)}
    for k, hw in enumerate(refs):
        sample[f"ref.{k}"] = torch.randn(16, *hw)
    image_tokens = sum(h * w // 4 for h, w in [TARGET_HW, *refs])
    shape = DiTShape(num_layers=layers, heads=2, head_dim=32, joint_attention_dim=TINY_TEXT_DIM,
                     image_tokens=image_tokens, text_tokens=TEXT_TOKENS, lora_rank=RANK,
                     lora_targets=preset.lora_targets, zero_cond_t=preset.zero_cond_t)
    return dit, sample, shape


def run_step(dit, sample, zero_cond_t: bool, checkpointing: bool, backward: bool = True):
    device = sample["target"].device
    cond = collate_conditioning([sample], device, torch.float32, zero_cond_t, gradient_checkpointing=checkpointing)
    # model_fn_qwen_image reads the text length with .tolist(): keep the mask a real tensor for meta models.
    cond["prompt_emb_mask"] = torch.ones(cond["prompt_emb_mask"].shape, dtype=torch.long)
    prediction = DiTDenoiser(dit)(latents=sample["target"][None], timestep=torch.tensor([500.0], device=device),
                                  **cond)
    if backward:
        torch.nn.functional.mse_loss(prediction, torch.zeros_like(prediction)).backward()


@pytest.mark.parametrize("attention", ["math", "fused"])
@pytest.mark.parametrize("preset_name,refs", CASES)
def test_forward_flops_match_flop_counter(preset_name, refs, attention):
    dit, sample, shape = make_case(preset_name, refs)
    with torch.no_grad(), counting(attention) as counter:
        run_step(dit, sample, shape.zero_cond_t, checkpointing=False, backward=False)
    assert counter.get_total_flops() == dit_forward_flops(shape)
    assert sum(forward_breakdown(shape).values()) == dit_forward_flops(shape)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("attention", ["math", "fused"])
@pytest.mark.parametrize("preset_name,refs", CASES)
def test_training_step_flops_match_flop_counter(preset_name, refs, attention, checkpointing):
    dit, sample, shape = make_case(preset_name, refs)
    assert all(".lora_" in n for n, p in dit.named_parameters() if p.requires_grad)
    with counting(attention) as counter:
        run_step(dit, sample, shape.zero_cond_t, checkpointing)
    assert all(p.grad is None for n, p in dit.named_parameters() if ".lora_" not in n)
    flops = lora_training_step_flops(shape, checkpointing, fused_attention=attention == "fused")
    assert flops["forward"] == dit_forward_flops(shape)
    assert (flops["recompute"] > 0) == checkpointing
    if attention == "math" and not checkpointing:
        assert counter.get_total_flops() == flops["model_flops"] == flops["hardware_flops"]
    else:
        assert counter.get_total_flops() == flops["hardware_flops"]


def test_real_widths_on_meta_tensors():
    """The real 2511 DiT's widths (3072 wide, 24 heads, 3584 text, 64 channels, 1024x1024 target + reference)
    at two blocks, counted on meta tensors (shapes only, nothing computed)."""
    shape = dataclasses.replace(real_2511_shape(), num_layers=2)
    with torch.device("meta"):
        dit = EditDiT(num_layers=2)
    inject_lora(dit, shape.lora_targets, rank=shape.lora_rank, alpha=shape.lora_rank)
    sample = {"target": torch.empty(16, 128, 128, device="meta"), "ref.0": torch.empty(16, 128, 128, device="meta"),
              "prompt_emb": torch.empty(shape.text_tokens, 3584, device="meta")}
    with torch.no_grad(), counting("math") as counter:
        run_step(dit, sample, True, checkpointing=False, backward=False)
    assert counter.get_total_flops() == dit_forward_flops(shape)
    with counting("math") as counter:
        run_step(dit, sample, True, checkpointing=True)
    assert counter.get_total_flops() == lora_training_step_flops(shape, True, fused_attention=False)["hardware_flops"]


def test_real_2511_shape_and_numbers():
    shape = real_2511_shape()
    assert (shape.width, shape.image_tokens, shape.text_tokens) == (3072, 2 * 4096, 232)
    assert edit_prompt_tokens(references=2) == 232 + 203
    step = lora_training_step_flops(shape, gradient_checkpointing=True)
    assert step["model_flops"] == step["forward"] + step["backward"]
    assert step["hardware_flops"] == step["model_flops"] + step["recompute"] + step["attention_backward_recompute"]
    # Frozen base: backward is roughly one forward (input gradients) plus attention's second forward.
    assert 1.0 < step["backward"] / step["forward"] < 1.5


def test_peak_table_and_mfu():
    assert peak_tflops_for("NVIDIA H100 80GB HBM3") == 989
    assert peak_tflops_for("NVIDIA H100 PCIe") == 756
    assert peak_tflops_for("NVIDIA H200") == 989
    assert peak_tflops_for("NVIDIA A100-SXM4-80GB") == 312
    assert peak_tflops_for("NVIDIA L40S") == 362
    assert peak_tflops_for("NVIDIA GeForce RTX 4090") == 165
    assert peak_tflops_for("NVIDIA RTX A6000") == 155
    assert peak_tflops_for("Tesla T4") is None
    assert mfu(500e12, 1.0, 1000e12) == pytest.approx(0.5)
