"""Check `edittuner plan` against real steps on this CPU (BENCHMARKS.md, "Memory plan", check a).

The Qwen-Image-Edit-2511 DiT at its real width (24 heads x 128 = 3072, text 3584) with ``--blocks`` blocks, the
2511 LoRA (rank 32) on a ``--resolution`` target and one reference, bf16 weights under bf16 autocast (a GPU run's
dtypes), random weights. Per case (checkpointing on / off, bf16 / int8 base): the real model is built as the
trainer builds it (``trainer.build_model``), AdamW's state is created by one step on zero gradients, then one
training step (losses, backward, clipping, AdamW step) runs under ``plan.LiveBytes`` on real CPU tensors, which
counts every live storage (weights, LoRA, AdamW state, activations, gradients, temporaries). The prediction is
``plan.phase2`` on a fake-tensor ``plan.trace`` of the same shape (no extrapolation: the same depth). Prints one
markdown row per case; ``--json`` writes them too.

    python -m benchmarks.plan_check --blocks 2 --resolution 256
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from edittuner.configs import PerformanceConfig, TrainConfig
from edittuner.families import FAMILIES, PRESETS, model_spec
from edittuner.plan import GiB, Levers, LiveBytes, Shape, phase2, run_step, sample_tensors, trace
from edittuner.trainer import build_model

VERSION = "2511"


def shape_for(blocks: int, resolution: int, ckpt: bool) -> Shape:
    preset = PRESETS[VERSION]
    size = FAMILIES[preset.family].real_size(preset)
    config = {**size.dit_config, "num_layers": blocks}
    side = resolution // 8
    return Shape(VERSION, tuple(sorted(config.items())), (side, side), ((side, side),),
                 FAMILIES[preset.family].plan_text_tokens(preset, 1), 32, preset.lora_targets, 1, ckpt, "bfloat16")


def measure(shape: Shape, quantization: str) -> dict:
    """One real training step at ``shape`` on this CPU, counted by LiveBytes."""
    preset = PRESETS[VERSION]
    family = FAMILIES[preset.family]
    cfg = TrainConfig(cache_dir=Path("unused"), output_dir=Path("unused"), model_version=VERSION, rank=shape.rank,
                      gradient_checkpointing=shape.gradient_checkpointing,
                      performance=PerformanceConfig(base_quantization=quantization))

    def random_dit(device, dtype):
        torch.manual_seed(0)
        dit = family.dit_from_config(dict(shape.dit_config))
        with torch.no_grad():
            for p in dit.parameters():
                p.normal_(0, p.shape[-1] ** -0.5 if p.dim() > 1 else 0.0)
        return dit.to(dtype)

    dit, params, _ = build_model(cfg, torch.device("cpu"), torch.bfloat16, load_dit=random_dit)
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.01)
    for p in params:
        p.grad = torch.zeros_like(p)
    optimizer.step()   # AdamW's moments exist from the second step on: measure a steady-state step
    optimizer.zero_grad(set_to_none=True)
    counter = LiveBytes()
    tensors = [*dit.parameters(), *dit.buffers()]
    tensors += [v for state in optimizer.state.values() for v in state.values() if isinstance(v, torch.Tensor)]
    counter.track(tensors)
    start = counter.live
    samples = sample_tensors(shape, 3584, 16)
    began = time.perf_counter()
    forward_end = run_step(family, model_spec(VERSION), dit, params, samples, torch.bfloat16,
                           shape.gradient_checkpointing, counter, optimizer)
    return {"start": start, "forward_end": forward_end, "peak": counter.peak, "step_s": time.perf_counter() - began}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.plan_check", description=__doc__.split("\n")[0])
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--quantization", action="append", choices=("none", "int8"), help="default: both")
    parser.add_argument("--checkpointing", action="append", choices=("on", "off"), help="default: both")
    args = parser.parse_args(argv)
    rows = []
    print("| blocks | resolution | levers | predicted peak | measured peak | predicted / measured |")
    print("|---|---|---|---|---|---|")
    for ckpt in (c == "on" for c in (args.checkpointing or ("on", "off"))):
        shape = shape_for(args.blocks, args.resolution, ckpt)
        for quantization in (args.quantization or ("none", "int8")):
            levers = Levers(ckpt, quantization)
            predicted = phase2(trace(replace(shape, quantized=quantization != "none")), levers, 1, 2).peak
            real = measure(shape, quantization)
            row = {"blocks": args.blocks, "resolution": args.resolution, "levers": levers.describe(),
                   "predicted": predicted, **real, "ratio": predicted / real["peak"]}
            rows.append(row)
            print(f"| {args.blocks} | {args.resolution}x{args.resolution} + 1 ref | {levers.describe()} | "
                  f"{predicted / GiB:.3f} GiB | {real['peak'] / GiB:.3f} GiB | {row['ratio']:.3f} |", flush=True)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
