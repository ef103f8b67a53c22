"""`edittuner plan` beside published memory figures (BENCHMARKS.md, "Memory plan", check b).

musubi-tuner's docs/qwen_image.md ("VRAM Usage Estimates with Memory Saving Options"): Qwen-Image (text to image,
no reference) LoRA at 1024x1024, batch 1, --mixed_precision bf16, --gradient_checkpointing, xformers; its example
command uses --network_dim 16 and networks.lora_qwen_image, which adapts every Linear of the transformer blocks.
The plan runs the same DiT (2509: Qwen-Image's sizes, no zero_cond_t) with no reference, rank 16 on the 2509
preset's targets (every block Linear but the MLPs' first layers: a trace with those too stopped with "does not
require grad" at 2 blocks without a reference, not investigated) and an assumed 64 prompt tokens. musubi's --blocks_to_swap N keeps N of the 60 fp8 blocks in host memory:
the plan has no such lever (ours keeps two blocks), so that row subtracts N blocks' fp8 weights from the fp8 plan.

    python -m benchmarks.plan_published
"""

from __future__ import annotations

import sys

from edittuner.configs import PlanConfig
from edittuner.plan import CUDA_CONTEXT_BYTES, FRAGMENTATION, GiB, Levers, make_plan

SOURCE = "musubi-tuner docs/qwen_image.md, VRAM Usage Estimates (kohya-ss/musubi-tuner)"


def main() -> int:
    plan = make_plan(PlanConfig(model_version="2509", resolution=1024, references=0, text_tokens=64, rank=16))
    bf16 = plan.phase2(Levers())
    fp8 = plan.phase2(Levers(base_quantization="fp8"))
    t = plan.traces[(True, False)]
    fp8_block = (t.quantizable + 4 * t.quantizable_rows + t.block_weight_bytes - 2 * t.quantizable) / t.offloaded_blocks
    rows = [("bf16, checkpointing", 42, bf16.peak), ("--fp8_base --fp8_scaled", 30, fp8.peak),
            ("+ --blocks_to_swap 16", 24, fp8.peak - 16 * fp8_block),
            ("+ --blocks_to_swap 45", 12, fp8.peak - 45 * fp8_block)]
    print("| published setting (Qwen-Image LoRA, 1024², batch 1) | published | plan: card needs | plan peak "
          "allocated | plan / published |")
    print("|---|---|---|---|---|")
    for title, published, peak in rows:
        need = peak * FRAGMENTATION + CUDA_CONTEXT_BYTES
        print(f"| {title} ({SOURCE}) | {published} GB | {need / GiB:.1f} GiB | {peak / GiB:.1f} GiB | "
              f"{need / GiB / published:.2f} |")
    edit = make_plan(PlanConfig(model_version="2511", resolution=1024, references=1))
    print(f"| for comparison: 2511 edit, 1024² target + 1024² reference, rank 32 (no published figure) | | "
          f"{edit.phase2(Levers()).card_need / GiB:.1f} GiB | {edit.phase2(Levers()).peak / GiB:.1f} GiB | |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
