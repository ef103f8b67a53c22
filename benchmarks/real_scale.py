"""Real-scale benchmark: Qwen-Image-Edit-2511 LoRA training (phase 2) and encoding (phase 1) on one GPU.

What it measures
----------------
Phase 2, at the real size: the 2511 DiT architecture (``EditDiT``: 60 blocks, 24 heads x 128 = 3072 wide, text
3584; 20.43 B parameters) with random bf16 weights, LoRA rank 32 on the 2511 targets, gradient checkpointing and
zero_cond_t on, one 1024x1024 target and one 1024x1024 reference (latents (1, 16, 128, 128) each: 8192 image
tokens) and a prompt embedding of ``benchmarks.flops.edit_prompt_tokens()`` (232) tokens. One step is what the
trainer does per sample: ``flow_matching_losses`` on a batch of one through ``DiTDenoiser`` under bf16 autocast,
backward, gradient clipping at 1.0 (the trainer's default ``--max_grad_norm``), AdamW (lr 1e-4, weight decay 0.01) on the LoRA
parameters, zero_grad. Per case: median seconds/step over ``--steps`` timed steps after the warm-up (2 steps, 3
with --compile, whose first steps compile), peak GPU memory (``max_memory_allocated`` and
``max_memory_reserved``, reset after the warm-up), model FLOPs per step (``benchmarks.flops``,
``lora_training_step_flops(shape, gradient_checkpointing=True)["model_flops"]``, 389.8 TFLOP) and MFU against
``peak_tflops_for(torch.cuda.get_device_name())`` (or ``--peak_tflops``), the loss of every step, and the DiT's
output on one fixed draw before the first step (the "probe" forward, called as in training).

Cases (each in a fresh model build; a refusal by ``PerformanceConfig.check``, an out-of-memory or any other
error is recorded with its message and the run goes on):
    baseline              PerformanceConfig(): attention auto, no compile, bf16 base, no offload
    attention_sdpa, attention_flash, attention_efficient, attention_cudnn, attention_math
                          the SDPA kernels (math materialises the 8.4k x 8.4k scores: slow, may run out of memory)
    compile               compile=True (regional torch.compile of the blocks)
    int8, fp8             base_quantization: also the DiT's weight bytes (``quantized_bytes``)
    offload               offload_blocks=True (frozen block weights in pinned host memory)
    phase1                the real-size encoders (below)
Every lever case is compared with the baseline of the same run, so the baseline runs whenever a phase-2 case is
selected (``--only int8`` runs baseline and int8). The DiT weights (seeded per tensor, generated on the run's
device), the LoRA initialisation (peft draws it on the CPU after ``torch.manual_seed``, as the trainer), the
inputs and each step's timestep and noise (``torch.manual_seed(seed_for_position(seed, step))``, as the
trainer) are the same in every case, so the per-step losses and the probe outputs of two cases differ only by
what the lever changes: each lever row reports both against the baseline (for int8 / fp8, what quantizing the
base does to the loss; with random weights this shows the numerical change, not a trained model's quality).

Phase 1, at the real size: the Qwen2.5-VL-7B text encoder (8.29 B parameters, sizes as in the released
config.json; built on the meta device, materialised on the GPU in bf16 with random weights, wrapped with
``EditTextEncoder.wrap``) and the Qwen-Image VAE (diffsynth's ``QwenImageVAE()`` defaults are the released
sizes). The tokenizer and processor are the built-in tiny ones (``edittuner.families.qwen_image_edit.tiny.build_processor``: a byte-level
tokenizer with Qwen's special tokens; the real tokenizer cannot be built offline), so the prompt is longer in
tokens than the real tokenizer makes it (one token per byte; ``prompt_tokens`` in the results); the vision
tokens (196 for a 384x384 reference) are the real count. Measured: samples/s of ``encode_images_and_prompt``
(prompt with the reference, VAE of reference, target and the white image) for a 1024x1024 target and one
1024x1024 reference (random-noise images), after one warm-up sample, and the peak memory.

``--scale tiny`` runs the same code with tiny sizes (the tiny DiT config of ``edittuner.families.qwen_image_edit.tiny``, the tiny text
encoder config and VAE sizes, 64x64 images) on the CPU in float32 (the trainer's dtype there): the CUDA-only
levers are then refused by ``PerformanceConfig.check`` (efficient, cudnn, fp8, offload), as expected, and MFU is
null. ``tests/test_real_scale.py`` runs it. ``--scale tiny --device cuda`` is a quick check of the GPU path.

Needs (real scale)
------------------
GPU: the bf16 DiT is 40.9 GB; baseline peak about 50-60 GB: an 80 GB H100 or a 141 GB H200. Phase 1 holds the
text encoder (16.6 GB) and the VAE. Host RAM: the int8, fp8 and offload cases materialise the bf16 DiT on the
CPU first, as the trainer loads it there (``load_device``): 41 GB of host RAM (offload then pins it); the
script refuses such a case when the host has less free memory, rather than be killed by the OOM killer. No
fp32 copy of any model is ever made on the host.

Running it on the device machine (no network there: carry what it lacks as wheels)
---------------------------------------------------------------------------------
The device image has torch (2.11 when last seen, not the project's 2.14 pin: results.json records the versions),
transformers, accelerate, peft, einops, imageio, pandas, psutil; it lacks diffsynth and torchao. Once, here::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \\
        -d .whl diffsynth==2.1.12 torchao==0.18.0 peft==0.21.2

(5 MB; ``.whl/`` is git-ignored; peft is carried to match the project's pin.) diffsynth imports
``modelscope.snapshot_download`` at import time and nothing else of it; the real modelscope needs modelscope-hub,
cryptography and cffi, none of them on the device, so the command below puts a stub in its place (nothing here
downloads). Each device call carries ``.whl`` and starts with::

    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \\
      && mkdir -p /tmp/site/modelscope \\
      && echo 'def snapshot_download(*a, **k): raise RuntimeError("offline")' > /tmp/site/modelscope/__init__.py \\
      && export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 || exit 1

then, first call (timeout_s 600; about 7 minutes)::

    python3 -m benchmarks.real_scale --scale tiny --device cuda --skip compile --out $OUT/tiny \\
      && python3 -m benchmarks.real_scale --out $OUT/real --only baseline,attention,phase1 --budget_s 420

second and third calls::

    python3 -m benchmarks.real_scale --out $OUT/real --only compile,offload --budget_s 300
    python3 -m benchmarks.real_scale --out $OUT/real --only int8,fp8 --budget_s 360

(``pip install -e .`` instead of the wheels where the package index is reachable.) Estimated on an H100 at real
size, from the FLOP count (389.8 model / 584 hardware TFLOP per step, ~800 TFLOP/s measured bf16 matmul): a step
1.2-2 s; a case's build 10-30 s; the baseline and each attention case about 30-60 s (math maybe 2 minutes, or out
of memory); phase 1 about a minute; compile 2-4 minutes (compilation, in the first forward and step); int8 / fp8
1-2 minutes each and offload 2-3 minutes (the DiT materialised in host memory, copied to the GPU; offload copies
82 GB over PCIe every step); plus ~30 s of imports per call. ``--budget_s`` starts no case after that many
seconds, so that a call ends inside the 10-minute limit with what it measured; results.json is rewritten after
every case and marks the case under way, so a killed run still leaves what it measured.

Output
------
``results.json`` (every figure, the exact command, the machine: GPU, driver, CUDA, torch, CPU count, host RAM,
and the date) and ``results.md`` (the tables) under ``--out`` (default ``$OUT`` if set, else
``benchmarks/results/real_scale``), both written atomically. The figures go into BENCHMARKS.md's real-scale
section by hand, with the command, machine and date they came with.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

STARTED = time.perf_counter()  # --budget_s counts from here: the imports below take a while

import torch  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from benchmarks.flops import DiTShape, edit_prompt_tokens, lora_training_step_flops, mfu, peak_tflops_for  # noqa: E402
from edittuner.atomic import atomic_path, write_json  # noqa: E402
from edittuner.errors import EditTunerError  # noqa: E402
from edittuner.families import PRESETS  # noqa: E402
from edittuner.families.qwen_image_edit.models import EditDiT  # noqa: E402
from edittuner.trainer import peak_rss_gb  # noqa: E402
from edittuner.performance import (PerformanceConfig, attention_backend, check_levers, load_device,  # noqa: E402
                                   quantized_bytes)

PRESET = PRESETS["2511"]
RANK = 32
ALPHA = 32.0                 # the trainer's default: alpha = rank
LEARNING_RATE = 1e-4         # the trainer's AdamW defaults
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
GiB = 2**30

REAL_DIT = {"num_layers": 60, "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 3584,
            "axes_dims_rope": (16, 56, 56)}
# Qwen2.5-VL-7B-Instruct's config.json (Qwen-Image's text_encoder/): transformers' own defaults are other sizes
# (text 8192 x 80 layers, vision hidden 3584), so every size is given.
REAL_TEXT = {"hidden_size": 3584, "intermediate_size": 18944, "num_hidden_layers": 28, "num_attention_heads": 28,
             "num_key_value_heads": 4, "vocab_size": 152064, "max_position_embeddings": 128000, "rms_norm_eps": 1e-6,
             "rope_theta": 1000000.0,
             "rope_scaling": {"mrope_section": [16, 24, 24], "rope_type": "default", "type": "default"},
             "hidden_act": "silu", "use_sliding_window": False, "sliding_window": 32768, "max_window_layers": 28,
             "attention_dropout": 0.0}
REAL_VISION = {"depth": 32, "hidden_size": 1280, "intermediate_size": 3420, "num_heads": 16, "out_hidden_size": 3584,
               "patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 112,
               "fullatt_block_indexes": [7, 15, 23, 31], "tokens_per_second": 2, "hidden_act": "silu"}
REAL_VAE: dict = {}          # QwenImageVAE() defaults: base_dim 96, z_dim 16, dim_mult [1, 2, 4, 4], 2 res blocks
EDIT_PROMPT = "Replace the red car with a blue bicycle and keep the street, the light and the shadows unchanged."
VL_PIXELS = 384 * 384        # ResizeConfig's default: the reference's area for the Qwen2.5-VL encoder

PHASE2_CASES = {
    "baseline": PerformanceConfig(),
    "attention_sdpa": PerformanceConfig(attention="sdpa"),
    "attention_flash": PerformanceConfig(attention="flash"),
    "attention_efficient": PerformanceConfig(attention="efficient"),
    "attention_cudnn": PerformanceConfig(attention="cudnn"),
    "attention_math": PerformanceConfig(attention="math"),
    "compile": PerformanceConfig(compile=True),
    "int8": PerformanceConfig(base_quantization="int8"),
    "fp8": PerformanceConfig(base_quantization="fp8"),
    "offload": PerformanceConfig(offload_blocks=True),
}
CASES = tuple(PHASE2_CASES) + ("phase1",)
GROUPS = {"attention": tuple(n for n in PHASE2_CASES if n.startswith("attention_")),
          "quantization": ("int8", "fp8"), "phase2": tuple(PHASE2_CASES), "all": CASES}
ROW_TITLES = {"baseline": "baseline (no lever: attention auto)", "compile": "compile=True",
              "int8": "base_quantization int8", "fp8": "base_quantization fp8", "offload": "offload_blocks=True",
              **{n: f"attention {n.split('_', 1)[1]}" for n in GROUPS["attention"]}}


@dataclass(frozen=True)
class Scale:
    name: str
    dit: dict
    image_size: int          # target and reference are image_size x image_size
    text_tokens: int


def scale_for(name: str) -> Scale:
    if name == "real":
        return Scale("real", dict(REAL_DIT), 1024, edit_prompt_tokens())
    from edittuner.families.qwen_image_edit.tiny import TINY_DIT
    return Scale("tiny", dict(TINY_DIT), 64, edit_prompt_tokens())


def dit_shape(scale: Scale) -> DiTShape:
    """What benchmarks.flops counts for one step at this scale."""
    config = scale.dit
    return DiTShape(num_layers=config["num_layers"], heads=config["num_attention_heads"],
                    head_dim=config["attention_head_dim"], joint_attention_dim=config["joint_attention_dim"],
                    image_tokens=2 * (scale.image_size // 16) ** 2, text_tokens=scale.text_tokens, lora_rank=RANK,
                    lora_targets=PRESET.lora_targets, zero_cond_t=PRESET.zero_cond_t)


# ---------------------------------------------------------------------------------------------------------------
# Models with random weights, never materialised in fp32 on the host

def dit_on_meta(config: dict) -> EditDiT:
    """The DiT's architecture on the meta device: no memory at all."""
    with torch.device("meta"):
        return EditDiT(**config)


def _is_norm_weight(model: torch.nn.Module, name: str) -> bool:
    owner, _, leaf = name.rpartition(".")
    return leaf == "weight" and "norm" in type(model.get_submodule(owner)).__name__.lower()


@torch.no_grad()
def random_init_(model: torch.nn.Module, seed: int, init_device: torch.device) -> None:
    """Fill every parameter in place: biases 0, norm weights 1, every other weight N(0, 1 / fan_in) (a small std:
    0.018 for the real DiT's 3072-wide layers; at any width each layer keeps its input's scale, so the blocks
    matter to the output at the tiny size too). Each tensor is drawn on ``init_device`` from its own seeded
    generator and copied to where the parameter lives, so the weights are the same wherever the model was
    materialised (GPU, or host memory for the levers that load there)."""
    for index, (name, param) in enumerate(model.named_parameters()):
        if name.endswith("bias"):
            param.zero_()
        elif _is_norm_weight(model, name) or param.dim() < 2:
            param.fill_(1.0)
        else:
            fan_in = param[0].numel()
            generator = torch.Generator(device=init_device).manual_seed(seed * 1_000_003 + index)
            value = torch.empty(param.shape, dtype=param.dtype, device=init_device)
            param.copy_(value.normal_(0.0, fan_in ** -0.5, generator=generator))


def _check_materialised(model: torch.nn.Module) -> None:
    for name, module in model.named_modules():
        tensors = [*module._parameters.items(), *module._buffers.items(),
                   *((k, v) for k, v in vars(module).items() if isinstance(v, torch.Tensor))]
        for attr, value in tensors:
            if value is not None and value.is_meta:
                raise RuntimeError(f"{name}.{attr} is still on the meta device")


def build_dit(config: dict, device: torch.device, dtype: torch.dtype, seed: int,
              init_device: torch.device) -> EditDiT:
    """Meta -> ``to_empty`` on ``device`` in ``dtype`` -> seeded fill; the rope tables (plain tensors computed in
    __init__) rebuilt off meta as ``ModelSource.load_dit`` does."""
    from diffsynth.models.qwen_image_dit import QwenEmbedRope

    dit = dit_on_meta(config)
    dit.to(dtype=dtype)  # still on meta: no memory
    dit.to_empty(device=device)
    random_init_(dit, seed, init_device)
    dit.pos_embed = QwenEmbedRope(theta=10000, axes_dim=list(dit.config["axes_dims_rope"]), scale_rope=True)
    _check_materialised(dit)
    return dit


def text_encoder_config(scale: str):
    """Qwen2.5-VL config: the 7B sizes (real) or edittuner.families.qwen_image_edit.tiny's, with the special-token ids of the built-in
    tokenizer (the real ids are out of its range; the vocabulary size, and so the compute, is the real one)."""
    from edittuner.families.qwen_image_edit.tiny import tiny_text_encoder_config
    config = tiny_text_encoder_config()
    if scale != "real":
        return config
    from transformers import Qwen2_5_VLConfig
    text = {**REAL_TEXT, "bos_token_id": config.text_config.bos_token_id,
            "eos_token_id": config.text_config.eos_token_id}
    return Qwen2_5_VLConfig(text_config=text, vision_config=dict(REAL_VISION), image_token_id=config.image_token_id,
                            video_token_id=config.video_token_id, vision_start_token_id=config.vision_start_token_id,
                            vision_end_token_id=config.vision_end_token_id, tie_word_embeddings=False)


def text_encoder_on_meta(config):
    from transformers import Qwen2_5_VLForConditionalGeneration
    with torch.device("meta"):
        return Qwen2_5_VLForConditionalGeneration(config)


def _rebuild_buffers(model: torch.nn.Module, names: list[str], device: torch.device) -> None:
    """Buffers computed in __init__ (the rotary inverse frequencies) are garbage after ``to_empty``: rebuild the
    parameter-free modules that own them from their config, off meta, as a from_pretrained load computes them."""
    for owner in sorted({name.rpartition(".")[0] for name in names}):
        module = model.get_submodule(owner)
        if next(module.parameters(), None) is not None or not hasattr(module, "config"):
            raise RuntimeError(f"{owner}: its buffers are computed at construction and this script does not know "
                               "how to rebuild them off the meta device")
        parent, _, attr = owner.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, attr, type(module)(module.config).to(device))


def build_text_encoder(config, device: torch.device, dtype: torch.dtype, seed: int):
    from edittuner.families.qwen_image_edit.models import EditTextEncoder

    hf = text_encoder_on_meta(config)
    hf.to(dtype=dtype)
    buffers = [name for name, _ in hf.named_buffers()]
    hf.to_empty(device=device)
    _rebuild_buffers(hf, buffers, device)
    random_init_(hf, seed, device)
    _check_materialised(hf)
    return EditTextEncoder.wrap(hf).eval()


def build_vae(config: dict, device: torch.device, dtype: torch.dtype, seed: int):
    """The VAE is small (127 M parameters at real size): its own initialisation, seeded, then moved and cast as
    ``ModelSource.load_vae`` does."""
    from diffsynth.models.qwen_image_vae import QwenImageVAE
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        vae = QwenImageVAE(**config)
    return vae.to(device=device, dtype=dtype).eval()


def parameter_count(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_bytes(model: torch.nn.Module, dtype: torch.dtype) -> int:
    return parameter_count(model) * torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------------------------
# Measurement helpers

def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> dict:
    if device.type != "cuda":
        return {"peak_allocated_gib": None, "peak_reserved_gib": None}
    return {"peak_allocated_gib": torch.cuda.max_memory_allocated(device) / GiB,
            "peak_reserved_gib": torch.cuda.max_memory_reserved(device) / GiB}


def host_available_bytes() -> int | None:
    try:
        import psutil
        return psutil.virtual_memory().available
    except ImportError:
        return None


def free_memory(device: torch.device) -> None:
    torch._dynamo.reset()
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def classify_error(exc: BaseException) -> str:
    text = str(exc).lower()
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text or "can't allocate memory" in text:
        return "out of memory"
    return "failed"


def error_message(exc: BaseException) -> str:
    message = f"{type(exc).__name__}: {exc}"
    return message if len(message) <= 2000 else message[:2000] + " ..."


def autocast(device: torch.device, dtype: torch.dtype):
    """The trainer's mixed precision: bf16 autocast around the forward on a GPU (accelerate's), none on the CPU."""
    return torch.autocast(device_type=device.type, dtype=dtype) if dtype == torch.bfloat16 else nullcontext()


def compare_losses(case: list[float], baseline: list[float]) -> dict:
    """Per-step loss against the baseline's on the same step (same seeds, weights, inputs)."""
    pairs = [(i, b, c) for i, (b, c) in enumerate(zip(baseline, case))]
    if not pairs:
        return {"steps": 0}
    rel = [abs(c - b) / max(abs(b), 1e-12) for _, b, c in pairs]
    return {"steps": len(pairs), "mean_rel_diff": statistics.fmean(rel), "max_rel_diff": max(rel),
            "mean_abs_diff": statistics.fmean(abs(c - b) for _, b, c in pairs),
            "per_step": [[i, b, c] for i, b, c in pairs]}


# ---------------------------------------------------------------------------------------------------------------
# Phase 2

@dataclass
class Run:
    scale: Scale
    device: torch.device
    dtype: torch.dtype
    seed: int
    steps: int
    warmup: int
    model_flops: int
    peak_tflops: float | None
    predictions: dict = field(default_factory=dict)  # case -> the probe forward's output (CPU, float32)


def make_sample(scale: Scale, seed: int) -> dict[str, torch.Tensor]:
    """One cached sample as phase 1 writes it: target and one reference latent, the prompt embedding."""
    generator = torch.Generator().manual_seed(seed)
    side = scale.image_size // 8
    return {"target": torch.randn(16, side, side, generator=generator),
            "ref.0": torch.randn(16, side, side, generator=generator),
            "prompt_emb": torch.randn(scale.text_tokens, scale.dit["joint_attention_dim"], generator=generator)}


def measure_phase2(run: Run, levers: PerformanceConfig, row: dict, warmup: int, log) -> None:
    """Build with the trainer's own ``build_model`` (levers checked, base where the levers want it, quantized, LoRA,
    placed), the base's weights random at the run's scale; then train and time. Fills ``row`` as it goes, so a
    failure keeps what was measured before it."""
    from edittuner.families.qwen_image_edit.denoiser import DiTDenoiser, collate_conditioning, training_scheduler
    from edittuner.objectives import FlowMatchConfig, flow_matching_draw, flow_matching_losses
    from edittuner.trainer import TrainConfig, build_model, seed_for_position

    device, dtype = run.device, run.dtype
    where = load_device(levers, device)
    if where.type == "cpu" and device.type == "cuda":
        need = model_bytes(dit_on_meta(run.scale.dit), dtype)
        available = host_available_bytes()
        row["host_bytes_needed"] = need
        if available is not None and available < need + 4 * GiB:
            raise MemoryError(f"out of memory: this lever loads the DiT into host memory first ({need / 1e9:.1f} GB "
                              f"in {str(dtype).replace('torch.', '')}) and the host has {available / 1e9:.1f} GB "
                              "available; not started, so the OOM killer does not end the whole run")
    start = time.perf_counter()

    def random_dit(load_to: torch.device, load_dtype: torch.dtype) -> EditDiT:
        dit = build_dit(run.scale.dit, load_to, load_dtype, run.seed, init_device=device)
        row["materialise_s"] = time.perf_counter() - start
        row["dit_parameters"] = parameter_count(dit)
        return dit

    def base_built(dit: EditDiT) -> None:
        row["dit_weight_bytes"] = quantized_bytes(dit)
        row["block_weight_bytes"] = quantized_bytes(dit.transformer_blocks)

    cfg = TrainConfig(cache_dir=Path("unused"), output_dir=Path("unused"), model_version=PRESET.name, rank=RANK,
                      alpha=ALPHA, seed=run.seed, learning_rate=LEARNING_RATE, weight_decay=WEIGHT_DECAY,
                      max_grad_norm=MAX_GRAD_NORM, performance=levers)
    dit, params, offload = build_model(cfg, device, dtype, load_dit=random_dit, on_base=base_built)
    # What the model's tensors hold after placing, LoRA included (offload: the frozen block weights are then
    # empty placeholders on the device, their pinned host copies not counted).
    row["placed_model_bytes"] = quantized_bytes(dit)
    row["lora_parameters"] = sum(p.numel() for p in params)
    row["lora_init_checksum"] = float(sum(p.detach().double().abs().sum().item() for p in params))
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    denoiser = DiTDenoiser(dit)
    denoiser.train()
    scheduler = training_scheduler()
    sample = make_sample(run.scale, run.seed)
    x0 = sample["target"][None].to(device, dtype)
    conditioning = collate_conditioning([sample], device, dtype, PRESET.zero_cond_t, gradient_checkpointing=True)
    flow = FlowMatchConfig()
    sync(device)
    row["build_s"] = time.perf_counter() - start
    log(f"  built in {row['build_s']:.1f} s (materialise {row['materialise_s']:.1f} s)")

    # The base model's prediction on one fixed draw (LoRA B is still zero), called exactly as in training (same
    # compiled graph): compared across cases, it shows what a lever changes in the output, which the loss (mostly
    # the regression target's own size, with random weights) barely shows.
    torch.manual_seed(run.seed + 7919)
    begin = time.perf_counter()
    timestep, latents, _ = flow_matching_draw(scheduler, x0, flow)
    with autocast(device, dtype):
        prediction = denoiser(latents=latents, timestep=timestep, **conditioning)
    run.predictions[row["case"]] = prediction.detach().float().cpu()
    del prediction
    sync(device)
    row["probe_forward_s"] = time.perf_counter() - begin

    losses = row["losses"] = []

    def step(index: int) -> float:
        with autocast(device, dtype):
            loss = flow_matching_losses(denoiser, scheduler, [x0], [seed_for_position(run.seed, index)],
                                        conditioning, flow)[0]
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, MAX_GRAD_NORM)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss.detach())  # waits for the step, as the trainer's float(reduce(...)) does
        if value != value or value in (float("inf"), float("-inf")):
            raise FloatingPointError(f"step {index}: loss is {value}")
        return value

    def timed(index: int) -> float:
        sync(device)
        begin = time.perf_counter()
        losses.append(step(index))
        sync(device)
        return time.perf_counter() - begin

    row["warmup_step_s"] = []
    for index in range(warmup):
        row["warmup_step_s"].append(timed(index))
        log(f"  warm-up step {index + 1}/{warmup}: {row['warmup_step_s'][-1]:.3f} s, loss {losses[-1]:.5f}")
    reset_peak(device)
    row["step_s"] = []
    for index in range(warmup, warmup + run.steps):
        row["step_s"].append(timed(index))
    median = statistics.median(row["step_s"])
    row.update(peak_memory(device))
    row.update({"median_step_s": median, "min_step_s": min(row["step_s"]), "max_step_s": max(row["step_s"]),
                "samples_per_s": 1.0 / median, "model_tflops_per_s": run.model_flops / median / 1e12,
                "mfu": mfu(run.model_flops, median, run.peak_tflops * 1e12) if run.peak_tflops else None,
                "host_peak_rss_gib": peak_rss_gb()})
    if offload is not None:
        row["offload"] = {"copies": offload.copies, "max_resident_blocks": offload.max_resident}
    memory = (f", peak {row['peak_allocated_gib']:.1f} GiB allocated / {row['peak_reserved_gib']:.1f} GiB reserved"
              if row["peak_allocated_gib"] is not None else "")
    log(f"  {run.steps} steps: median {median:.3f} s/step{memory}")


def run_phase2_case(name: str, run: Run, log) -> dict:
    levers = PHASE2_CASES[name]
    row = {"case": name, "status": "running", "levers": asdict(levers), "description": levers.describe()}
    try:
        check_levers(levers, run.device, run.dtype, gradient_checkpointing=True)
    except EditTunerError as exc:
        log(f"  refused: {exc}")
        return {**row, "status": "refused", "error": str(exc)}
    warmup = max(run.warmup, 3) if levers.compile else run.warmup
    row.update(planned(run.scale, levers))
    try:
        with attention_backend(levers.attention):
            measure_phase2(run, levers, row, warmup, log)
        row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001 - any failure is a result, never the end of the run
        row["status"], row["error"] = classify_error(exc), error_message(exc)
        row["traceback"] = traceback.format_exc(limit=-8)
        log(f"  {row['status']}: {row['error'][:300]}")
        del exc
    finally:
        if run.device.type == "cuda" and row["status"] != "ok":
            row.update({f"{k}_at_failure": v for k, v in peak_memory(run.device).items()})
        free_memory(run.device)
    return row


def planned(scale: Scale, levers: PerformanceConfig) -> dict:
    """`edittuner plan`'s prediction for this case (real scale only: the plan is of the released model), so the
    results table shows it beside the measured peak (BENCHMARKS.md, "Memory plan", check c)."""
    if scale.name != "real":
        return {}
    try:
        from edittuner.configs import PlanConfig
        from edittuner.plan import make_plan
        plan = make_plan(PlanConfig(model_version=PRESET.name, resolution=scale.image_size, references=1,
                                    text_tokens=scale.text_tokens, rank=RANK,
                                    base_quantization=levers.base_quantization, offload_blocks=levers.offload_blocks))
        predicted = plan.phase2(plan.levers)
        return {"planned_peak_gib": predicted.peak / GiB, "planned_card_need_gib": predicted.card_need / GiB}
    except Exception as exc:  # noqa: BLE001 - a plan failure must not cost the measurement
        return {"planned_error": error_message(exc)}


def compare_with_baseline(results: dict, predictions: dict) -> None:
    cases = results["phase2"]
    base = cases.get("baseline")
    if not base or base.get("status") != "ok":
        return
    for name, row in cases.items():
        if name == "baseline" or row.get("status") != "ok":
            continue
        versus = {"step_time_ratio": row["median_step_s"] / base["median_step_s"],
                  "loss": compare_losses(row["losses"], base["losses"]),
                  "same_lora_init": row.get("lora_init_checksum") == base.get("lora_init_checksum"),
                  "dit_weight_bytes_ratio": row["dit_weight_bytes"] / base["dit_weight_bytes"]}
        if name in predictions and "baseline" in predictions:
            ours, reference = predictions[name], predictions["baseline"]
            versus["prediction_rel_l2_diff"] = float((ours - reference).norm() / reference.norm().clamp_min(1e-30))
        if row.get("peak_allocated_gib") is not None and base.get("peak_allocated_gib"):
            versus["peak_allocated_ratio"] = row["peak_allocated_gib"] / base["peak_allocated_gib"]
            versus["peak_reserved_ratio"] = row["peak_reserved_gib"] / base["peak_reserved_gib"]
        row["vs_baseline"] = versus


# ---------------------------------------------------------------------------------------------------------------
# Phase 1

def noise_image(size: int, seed: int):
    import numpy as np
    from PIL import Image
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB")


def measure_phase1(scale: Scale, device: torch.device, dtype: torch.dtype, seed: int, samples: int, row: dict,
                   log) -> None:
    from edittuner.families.qwen_image_edit.encoding import encode_images_and_prompt, make_encoding_pipe, reference_prompt_embedder
    from edittuner.families.qwen_image_edit.models import Encoders
    from edittuner.families.qwen_image_edit.tiny import TINY_VAE, build_processor

    start = time.perf_counter()
    text_encoder = build_text_encoder(text_encoder_config(scale.name), device, dtype, seed)
    vae = build_vae(REAL_VAE if scale.name == "real" else dict(TINY_VAE), device, dtype, seed)
    encoders = Encoders(text_encoder, build_processor(), vae, fingerprint=f"random:{scale.name}:{seed}")
    pipe = make_encoding_pipe(encoders, device, dtype)
    embedder = reference_prompt_embedder(VL_PIXELS)
    sync(device)
    row.update({"build_s": time.perf_counter() - start, "text_encoder_parameters": parameter_count(text_encoder),
                "vae_parameters": parameter_count(vae),
                "attn_implementation": getattr(text_encoder.config, "_attn_implementation", None),
                "tokenizer": "edittuner.families.qwen_image_edit.tiny.build_processor (byte-level, Qwen special tokens)",
                "image_size": scale.image_size, "prompt": EDIT_PROMPT})
    log(f"  built in {row['build_s']:.1f} s: text encoder {_count(row['text_encoder_parameters'])}, "
        f"VAE {_count(row['vae_parameters'])} parameters")
    target, reference = noise_image(scale.image_size, seed), noise_image(scale.image_size, seed + 1)

    def one() -> float:
        sync(device)
        begin = time.perf_counter()
        tensors = encode_images_and_prompt(pipe, embedder, EDIT_PROMPT, target, [reference], None)
        sync(device)
        row["prompt_tokens"] = int(tensors["prompt_emb"].shape[0])
        row["latent_shape"] = list(tensors["target"].shape)
        if not all(torch.isfinite(t).all() for t in tensors.values()):
            raise FloatingPointError("phase 1 produced non-finite values")
        return time.perf_counter() - begin

    row["warmup_sample_s"] = one()
    reset_peak(device)
    row["sample_s"] = [one() for _ in range(samples)]
    median = statistics.median(row["sample_s"])
    row.update({"median_sample_s": median, "samples_per_s": 1.0 / median, **peak_memory(device)})

    # Where the time goes: the prompt (Qwen2.5-VL with the reference) and one VAE encode, timed alone.
    def timed(fn) -> float:
        sync(device)
        begin = time.perf_counter()
        with torch.no_grad():
            fn()
        sync(device)
        return time.perf_counter() - begin

    repeats = max(1, min(samples, 3))
    row["prompt_s"] = statistics.median(timed(lambda: embedder.process(pipe, EDIT_PROMPT, edit_image=[reference]))
                                        for _ in range(repeats))
    row["vae_encode_s"] = statistics.median(timed(lambda: pipe.vae.encode(pipe.preprocess_image(target)))
                                            for _ in range(repeats))
    memory = (f", peak {row['peak_allocated_gib']:.1f} GiB allocated" if row["peak_allocated_gib"] is not None else "")
    log(f"  {samples} samples: {row['samples_per_s']:.3f} samples/s ({median:.3f} s/sample; prompt "
        f"{row['prompt_s']:.3f} s, one VAE encode {row['vae_encode_s']:.3f} s){memory}")


def run_phase1(scale: Scale, device: torch.device, dtype: torch.dtype, seed: int, samples: int, log) -> dict:
    row = {"status": "running"}
    try:
        measure_phase1(scale, device, dtype, seed, samples, row, log)
        row["status"] = "ok"
    except Exception as exc:  # noqa: BLE001
        row["status"], row["error"] = classify_error(exc), error_message(exc)
        row["traceback"] = traceback.format_exc(limit=-8)
        log(f"  {row['status']}: {row['error'][:300]}")
        del exc
    finally:
        free_memory(device)
    return row


# ---------------------------------------------------------------------------------------------------------------
# Machine, output

def _driver_version() -> str | None:
    try:
        result = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=20)
        return result.stdout.strip().splitlines()[0] if result.returncode == 0 and result.stdout.strip() else None
    except (OSError, subprocess.SubprocessError):
        return None


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def machine_info(device: torch.device) -> dict:
    try:
        host_ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    except (ValueError, OSError, AttributeError):
        host_ram = None
    info = {"platform": platform.platform(), "machine": platform.machine(), "python": platform.python_version(),
            "torch": torch.__version__, "cuda": torch.version.cuda, "cpu_count": os.cpu_count(),
            "host_ram_gib": host_ram, "gpu": None,
            "packages": {n: _version(n) for n in ("diffsynth", "transformers", "peft", "accelerate", "torchao")}}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update({"gpu": torch.cuda.get_device_name(device), "gpu_memory_gib": props.total_memory / GiB,
                     "compute_capability": "%d.%d" % torch.cuda.get_device_capability(device),
                     "driver": _driver_version(), "cudnn": torch.backends.cudnn.version()})
    return info


def machine_line(info: dict) -> str:
    parts = []
    if info.get("gpu"):
        parts.append(f"{info['gpu']} ({info['gpu_memory_gib']:.0f} GiB, sm {info['compute_capability']}), "
                     f"driver {info.get('driver') or '?'}, CUDA {info.get('cuda')}")
    else:
        parts.append("CPU only")
    ram = f"{info['host_ram_gib']:.0f} GiB host RAM" if info.get("host_ram_gib") else "host RAM ?"
    parts.append(f"{info['cpu_count']} CPUs, {ram}, {info['machine']}, Python {info['python']}, "
                 f"torch {info['torch']}")
    return "; ".join(parts)


def _ms_or_s(seconds: float) -> str:
    return f"{seconds:.3f} s" if seconds >= 1 else f"{seconds * 1000:.1f} ms"


def _count(n: float) -> str:
    for unit, size in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.3f} {unit}"
    return f"{n:g}"


def _flop(n: float) -> str:
    for unit, size in (("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= size:
            return f"{n / size:.2f} {unit}"
    return f"{n:g} FLOP"


def _bytes(n: float) -> str:
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def _memory(row: dict) -> str:
    if row.get("peak_allocated_gib") is None:
        return "n/a (CPU)"
    plan = ""
    if row.get("planned_peak_gib") is not None:   # `edittuner plan`'s prediction beside the measurement
        plan = (f" (plan: {row['planned_peak_gib']:.2f} GiB allocated, "
                f"{row['planned_peak_gib'] / row['peak_allocated_gib']:.3f} of measured)")
    return f"{row['peak_allocated_gib']:.2f} GiB allocated, {row['peak_reserved_gib']:.2f} GiB reserved{plan}"


def _cell(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "\\|")


def _not_ok(title: str, row: dict) -> str:
    return f"| {title} | {_cell(row.get('status'))}: {_cell(row.get('error') or '')} | | |"


def render_markdown(results: dict) -> str:
    settings, flops = results["settings"], results["flops"]
    dit = ", ".join(f"{k} {v}" for k, v in settings["dit"].items())
    lines = [f"# Real-scale benchmark ({results['scale']} scale)", "",
             f"Command: `{results['command']}`  ", f"Machine: {machine_line(results['machine'])}  ",
             f"Date: {results['date']}  ", f"Status: {results['status']}", "",
             f"Model: EditDiT ({dit}; {_count(settings['dit_parameters'])} parameters, random weights), "
             f"{settings['dtype']} on {settings['device']}; LoRA rank {RANK} on the 2511 targets; gradient "
             f"checkpointing and zero_cond_t on; target {settings['image_size']}x{settings['image_size']} + one "
             f"reference of the same size ({settings['image_tokens']} image tokens), {settings['text_tokens']} text "
             f"tokens; AdamW with clipping at {MAX_GRAD_NORM}; median of {settings['steps']} timed steps after "
             f"{settings['warmup']} warm-up steps (compile: at least 3).", "",
             f"FLOPs per step used for MFU (`benchmarks.flops.lora_training_step_flops(shape, "
             f"gradient_checkpointing=True)`): model {_flop(flops['model_flops'])} (forward "
             f"{_flop(flops['forward'])} + backward {_flop(flops['backward'])}); hardware, with the checkpointing "
             f"recompute and the fused-attention backward recompute, {_flop(flops['hardware_flops'])}. "
             f"Peak: {results['peak_tflops_note']}.", "",
             "| figure | value | baseline (same run) | ratio (value / baseline) |", "|---|---|---|---|"]
    cases = results["phase2"]
    base = cases.get("baseline", {})
    base_ok = base.get("status") == "ok"
    for name, row in cases.items():
        title = ROW_TITLES[name]
        if row.get("status") != "ok":
            lines.append(_not_ok(f"phase 2, {title}", row))
            continue
        mfu_text = f", MFU {row['mfu'] * 100:.1f}%" if row.get("mfu") is not None else ""
        value = f"{_ms_or_s(row['median_step_s'])}/step ({row['model_tflops_per_s']:.3g} TFLOP/s{mfu_text})"
        if name == "baseline":
            lines.append(f"| phase 2 step, {title} | {value} | | |")
            lines.append(f"| phase 2 peak memory, {title} | {_memory(row)} | | |")
            lines.append(f"| phase 2 build (materialise, LoRA, place), {title} | {row['build_s']:.1f} s | | |")
            continue
        versus = row.get("vs_baseline", {})
        base_value = f"{_ms_or_s(base['median_step_s'])}/step" if base_ok else ""
        ratio = f"{versus['step_time_ratio']:.3f}" if "step_time_ratio" in versus else ""
        lines.append(f"| step, {title} | {value} | {base_value} | {ratio} |")
        if row.get("peak_allocated_gib") is not None:
            mem_ratio = f"{versus['peak_allocated_ratio']:.3f}" if "peak_allocated_ratio" in versus else ""
            lines.append(f"| peak memory, {title} | {_memory(row)} | {_memory(base) if base_ok else ''} | "
                         f"{mem_ratio} |")
        if name in ("int8", "fp8", "offload", "compile"):
            value = (f"build {row['build_s']:.1f} s, first forward {_ms_or_s(row['probe_forward_s'])}, first step "
                     f"{_ms_or_s(row['warmup_step_s'][0])}; host peak RSS so far {row['host_peak_rss_gib']:.1f} GiB")
            base_value = (f"build {base['build_s']:.1f} s, first forward {_ms_or_s(base['probe_forward_s'])}, first "
                          f"step {_ms_or_s(base['warmup_step_s'][0])}") if base_ok else ""
            lines.append(f"| build and first steps, {title} | {value} | {base_value} | |")
        if name in ("int8", "fp8"):
            bytes_ratio = f"{versus['dit_weight_bytes_ratio']:.3f}" if "dit_weight_bytes_ratio" in versus else ""
            lines.append(f"| DiT weight bytes (`quantized_bytes`), {title} | {_bytes(row['dit_weight_bytes'])} | "
                         f"{_bytes(base['dit_weight_bytes']) if base_ok else ''} | {bytes_ratio} |")
        if "prediction_rel_l2_diff" in versus:
            lines.append(f"| output vs baseline (probe forward, relative L2), {title} | "
                         f"{versus['prediction_rel_l2_diff']:.2e} | same draw, weights, LoRA | |")
        if versus.get("loss", {}).get("steps"):
            loss = versus["loss"]
            lines.append(f"| loss vs baseline, {title} | mean relative difference {loss['mean_rel_diff']:.2e} (max "
                         f"{loss['max_rel_diff']:.2e}) over {loss['steps']} steps | same steps, seeds, weights | |")
    phase1 = results.get("phase1")
    if phase1 is not None:
        if phase1.get("status") == "ok":
            lines.append(f"| phase 1 (prompt with the reference; VAE of reference, target, white) | "
                         f"{phase1['samples_per_s']:.3f} samples/s ({_ms_or_s(phase1['median_sample_s'])}/sample; "
                         f"prompt {_ms_or_s(phase1['prompt_s'])}, one VAE encode {_ms_or_s(phase1['vae_encode_s'])}; "
                         f"{phase1['prompt_tokens']} prompt tokens) | | |")
            lines.append(f"| phase 1 peak memory | {_memory(phase1)} | | |")
            lines.append(f"| phase 1 build | {phase1['build_s']:.1f} s (text encoder "
                         f"{_count(phase1['text_encoder_parameters'])}, VAE {_count(phase1['vae_parameters'])} "
                         "parameters) | | |")
        else:
            lines.append(_not_ok("phase 1", phase1))
    lines += card_table(cases)
    lines += ["", "Random weights: the output and loss differences show what a lever changes numerically, not what "
              "it does to a trained model's quality. Refused, failed and out-of-memory rows: the full message and "
              "traceback are in results.json."]
    return "\n".join(lines) + "\n"


CARDS_GIB = (24, 48, 80)
CARD_HEADROOM = 0.95  # of the card's memory: what other processes, the CUDA context and fragmentation leave


def card_table(cases: dict) -> list[str]:
    """"What to use on a 24 / 48 / 80 GB card", from this run's measured peaks alone: the cases whose peak
    reserved memory fits in CARD_HEADROOM of the card, fastest first. Levers are measured one at a time, so a
    combination is never recommended."""
    measured = {name: row for name, row in cases.items()
                if row.get("status") == "ok" and row.get("peak_reserved_gib") is not None}
    if not measured:
        return []
    lines = ["", f"What fits on which card (peak reserved memory of this run <= {CARD_HEADROOM:.0%} of the card; "
             "fastest first; one lever at a time):", "", "| card | use | also fits | does not fit |", "|---|---|---|---|"]
    for card in CARDS_GIB:
        fits = sorted((n for n, r in measured.items() if r["peak_reserved_gib"] <= CARD_HEADROOM * card),
                      key=lambda n: measured[n]["median_step_s"])
        too_big = [n for n in measured if n not in fits]

        def label(name):
            row = measured[name]
            return f"{ROW_TITLES[name]} ({_ms_or_s(row['median_step_s'])}/step, {row['peak_reserved_gib']:.1f} GiB)"
        use = label(fits[0]) if fits else "nothing measured fits"
        lines.append(f"| {card} GB | {_cell(use)} | {_cell('; '.join(label(n) for n in fits[1:]))} | "
                     f"{_cell('; '.join(label(n) for n in too_big))} |")
    return lines


def write_outputs(out: Path, results: dict) -> None:
    write_json(out / "results.json", results)
    with atomic_path(out / "results.md") as tmp:
        tmp.write_text(render_markdown(results), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------

def parse_cases(text: str | None, default: tuple[str, ...] = CASES) -> tuple[str, ...]:
    if not text:
        return default
    names = []
    for item in (n.strip() for n in text.split(",") if n.strip()):
        expanded = GROUPS.get(item, (item,))
        for name in expanded:
            if name not in CASES:
                raise SystemExit(f"unknown case {item!r}; choose from {', '.join(CASES)} or the groups "
                                 f"{', '.join(GROUPS)}")
            names.append(name)
    return tuple(dict.fromkeys(names))


def default_out() -> Path:
    return Path(os.environ["OUT"]) if os.environ.get("OUT") else ROOT / "benchmarks/results/real_scale"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = argparse.ArgumentParser(prog="python -m benchmarks.real_scale", description=__doc__.split("\n")[0])
    parser.add_argument("--scale", choices=["real", "tiny"], default="real")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto",
                        help="auto: cuda at real scale, cpu at tiny scale")
    parser.add_argument("--out", type=Path, default=None, help="default: $OUT if set, else benchmarks/results/real_scale")
    parser.add_argument("--steps", type=int, default=5, help="timed steps per case (after the warm-up)")
    parser.add_argument("--warmup", type=int, default=2, help="warm-up steps per case (at least 2; compile: 3)")
    parser.add_argument("--phase1_samples", type=int, default=None, help="timed phase-1 samples (default --steps)")
    parser.add_argument("--only", default=None, metavar="CASES",
                        help=f"comma-separated cases or groups: {', '.join(CASES)}; groups {', '.join(GROUPS)}. "
                             "A phase-2 lever brings the baseline along (same-run comparison)")
    parser.add_argument("--skip", default=None, metavar="CASES", help="cases or groups to leave out (recorded as skipped)")
    parser.add_argument("--peak_tflops", type=float, default=None, help="dense bf16 peak TFLOP/s for MFU "
                        "(default: benchmarks.flops.peak_tflops_for(the GPU's name))")
    parser.add_argument("--budget_s", type=float, default=None,
                        help="start no further case once this many seconds have passed since the start (imports "
                             "included); a 10-minute device call: 300-450, by what the remaining cases take")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.steps < 1:
        parser.error("--steps must be at least 1")
    began = STARTED
    selected = parse_cases(args.only)
    skipped = set(parse_cases(args.skip, ())) if args.skip else set()
    if set(selected) & set(PHASE2_CASES) - {"baseline"}:
        selected = ("baseline",) + tuple(n for n in selected if n != "baseline")
    order = [n for n in ("baseline", "phase1", *PHASE2_CASES) if n in selected]
    order = list(dict.fromkeys(order))

    scale = scale_for(args.scale)
    device = torch.device(("cuda" if args.scale == "real" else "cpu") if args.device == "auto" else args.device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit("this run needs a CUDA GPU and torch sees none; use --scale tiny (CPU) here")
        device = torch.device("cuda", torch.cuda.current_device())  # cuda:0, as accelerate names it
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32  # the trainer's mixed precision "auto"
    out = args.out or default_out()
    out.mkdir(parents=True, exist_ok=True)

    shape = dit_shape(scale)
    flops = lora_training_step_flops(shape, gradient_checkpointing=True)
    info = machine_info(device)
    peak, note = args.peak_tflops, None
    if peak is not None:
        note = f"{peak:g} TFLOP/s (--peak_tflops)"
    elif device.type == "cuda":
        peak = peak_tflops_for(info["gpu"])
        note = (f"{peak:g} TFLOP/s dense BF16 for {info['gpu']} (benchmarks.flops.PEAK_BF16_DENSE_TFLOPS)" if peak
                else f"unknown for {info['gpu']!r}: MFU is null; pass --peak_tflops")
    else:
        note = "none on the CPU: MFU is null"
    run = Run(scale, device, dtype, args.seed, args.steps, max(2, args.warmup), flops["model_flops"], peak)

    results = {
        "command": "python -m benchmarks.real_scale " + " ".join(shlex.quote(a) for a in argv),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": info, "scale": scale.name, "status": "running", "cases_selected": order,
        "settings": {"dit": {k: list(v) if isinstance(v, tuple) else v for k, v in scale.dit.items()},
                     "dit_parameters": parameter_count(dit_on_meta(scale.dit)), "device": str(device),
                     "dtype": str(dtype).replace("torch.", ""), "image_size": scale.image_size,
                     "image_tokens": shape.image_tokens, "text_tokens": shape.text_tokens, "lora_rank": RANK,
                     "lora_alpha": ALPHA, "lora_targets": list(PRESET.lora_targets), "zero_cond_t": True,
                     "gradient_checkpointing": True, "steps": run.steps, "warmup": run.warmup, "seed": args.seed,
                     "optimizer": {"name": "AdamW", "lr": LEARNING_RATE, "weight_decay": WEIGHT_DECAY,
                                   "max_grad_norm": MAX_GRAD_NORM},
                     "init": "per tensor N(0, 1/fan_in), seeded; biases 0, norm weights 1"},
        "flops": {**flops, "shape": {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(shape).items()}},
        "peak_tflops": peak, "peak_tflops_note": note, "phase2": {},
    }

    def log(message: str) -> None:
        print(f"[{time.perf_counter() - began:7.1f} s] {message}", flush=True)

    log(f"{scale.name} scale on {device} ({machine_line(info)}); cases: {', '.join(order)}; out: {out}")
    log(f"model FLOPs per step {_flop(flops['model_flops'])}; peak: {note}")
    for name in order:
        target = results if name == "phase1" else results["phase2"]
        if name in skipped:
            target[name] = {"status": "skipped", "error": "--skip"}
            log(f"{name}: skipped (--skip)")
            continue
        if args.budget_s is not None and time.perf_counter() - began > args.budget_s:
            target[name] = {"status": "skipped", "error": f"--budget_s {args.budget_s:g} reached before it started"}
            log(f"{name}: skipped (time budget)")
            continue
        target[name] = {"status": "running"}
        write_outputs(out, results)  # a run killed now shows which case it was in
        log(f"{name}: {PHASE2_CASES[name].describe() if name in PHASE2_CASES else 'text encoder + VAE'}")
        if name == "phase1":
            results["phase1"] = run_phase1(scale, device, dtype, args.seed, args.phase1_samples or args.steps, log)
        else:
            results["phase2"][name] = run_phase2_case(name, run, log)
            compare_with_baseline(results, run.predictions)
        write_outputs(out, results)
    results["status"] = "complete"
    results["wall_s"] = time.perf_counter() - began
    write_outputs(out, results)
    print(render_markdown(results), flush=True)
    log(f"wrote {out / 'results.json'} and {out / 'results.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
