"""`edittuner plan`: will a run fit, and how long will a step take, before a GPU is rented.

Method (README "Will it fit?")
------------------------------
Phase 2's memory is *traced*, not guessed: the family's DiT at its released width and sequence lengths, with the
trainer's own LoRA injection (``lora.inject_lora``), objective (``objectives``, the family's denoiser and
conditioning), autocast, backward and gradient clipping, runs one training step on fake tensors
(``torch._subclasses.FakeTensorMode``: shapes and dtypes, no memory, no arithmetic) while ``LiveBytes`` (a
``TorchDispatchMode``) counts the bytes of every live tensor storage and the matmul / attention FLOPs. A traced
model has fewer blocks than the released one (the family's ``RealSize.depth``: the fewest, and one more of each
kind); every figure is affine in the block count (each block adds the same weights, saved activations and FLOPs),
so the released depth is extrapolated from those traces. The traces depend on the shapes, rank, targets, batch,
dtype, checkpointing and whether the base is quantized only, and are cached per configuration (``~/.cache/edittuner/plan``), so lever sets
cost arithmetic on top:

* base weights: the traced parameter bytes. An int8 / fp8 base is traced too, with each block Linear run as
  torchao's weight-only tensors run it (one byte per weight and a per-row scale, dequantized to bf16 for each
  matmul, which keeps that copy for the backward); ``--offload_blocks`` keeps two blocks of frozen weights on the
  card (``performance.BlockOffload``), ZeRO-3 keeps 1/N of everything plus two gathered blocks;
* LoRA + optimizer: fp32 LoRA parameters and AdamW's two fp32 moments (ZeRO-3: 1/N);
* activations: what the forward leaves alive for the backward (the traced live bytes after the forward);
* temporaries: the rest of the traced peak (gradients as they accumulate, the backward's working tensors, an
  DDP's gradient bucket), or AdamW's step if that is higher.

Phase 1 is arithmetic: the text encoder's and VAE's weights in bf16, the text encoder's activations for the
prompt, and the VAE encoder's full-resolution feature maps (a handful of ``vae_width``-channel maps alive at once).

Time per step: the traced hardware FLOPs (checkpointing's recompute included) at ``--mfu`` of the card's dense bf16
peak (``configs.CARDS``), plus, for block offload, copying the frozen blocks over PCIe twice per step (forward and
recompute), and for ZeRO-3, gathering the weights three times per step; neither is assumed to overlap compute.
A quantized base is costed at ``QUANT_SLOWDOWN`` (its dequantization before each matmul).

BENCHMARKS.md ("Memory plan") checks the traces against real CPU steps at the real width and the whole plan
against published figures; ``benchmarks/real_scale.py`` prints the prediction beside each measured GPU row.
"""

from __future__ import annotations

import hashlib
import json
import os
import weakref
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from .configs import CARDS, PlanConfig
from .errors import EditTunerError
from .families import FAMILIES, PRESETS, model_spec

GB = 1e9
PLAN_FORMAT = 3              # bump when the trace changes: cached traces of another format are ignored
CUDA_CONTEXT_BYTES = 1.0e9   # the CUDA context, cuBLAS / attention workspaces: outside torch's allocator counts
FRAGMENTATION = 1.05         # reserved / allocated of a long training run (the caching allocator's slack)
PCIE_BYTES_PER_S = 25e9      # PCIe 4.0 x16 host->device, pinned, as measured (not the 32 GB/s nominal)
NVLINK_BYTES_PER_S = 150e9   # ZeRO-3's all-gather, effective per GPU
QUANT_SLOWDOWN = 1.10        # weight-only int8 / fp8: dequantize each weight before its bf16 matmul
OFFLOAD_RESIDENT_BLOCKS = 2  # performance.BlockOffload: the running block and, in the backward, the next one
ZERO3_GATHERED_BLOCKS = 2    # the block running and the one prefetched


# ---------------------------------------------------------------------------------------------------------------
# Live bytes and FLOPs of what runs under the mode

class LiveBytes(TorchDispatchMode):
    """Counts the bytes of live tensor storages (each storage once, freed when the storage is) and their peak,
    plus matmul and attention FLOPs (torch's FlopCounterMode formulas). Works on real and fake tensors alike:
    BENCHMARKS.md measures real CPU steps with it and the plan traces fake ones. ``track`` counts tensors that
    existed before (weights, optimizer state)."""

    def __init__(self):
        super().__init__()
        self.live = self.peak = self.flops = 0
        self._sizes: dict[int, int] = {}

    def track(self, tensors) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor):
                self._add(t)

    def _add(self, t: torch.Tensor) -> None:
        if type(t) not in (torch.Tensor, torch.nn.Parameter) and hasattr(t, "__tensor_flatten__"):
            # A quantized weight (torchao): its data and scales are what it holds.
            names, _ = t.__tensor_flatten__()
            self.track(getattr(t, name) for name in names)
            return
        storage = t.untyped_storage()
        key = id(storage)
        if key in self._sizes:
            return
        self._sizes[key] = storage.nbytes()
        self.live += storage.nbytes()
        self.peak = max(self.peak, self.live)
        weakref.finalize(storage, self._free, key)

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key, 0)

    def reset_peak(self) -> None:
        self.peak = self.live

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.flops += _flops(func, args, kwargs, out)
        self.track(tree_flatten(out)[0])
        return out


def _flop_formulas():
    from torch.utils.flop_counter import flop_registry
    aten = torch.ops.aten
    formulas = dict(flop_registry)
    # The CPU's fused attention (what the trace runs) costs what the GPU kernels cost: same arguments first.
    formulas[aten._scaled_dot_product_flash_attention_for_cpu] = flop_registry[aten._scaled_dot_product_flash_attention]
    formulas[aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
        flop_registry[aten._scaled_dot_product_flash_attention_backward]
    return formulas


_FORMULAS: dict = {}


def _flops(func, args, kwargs, out) -> int:
    if not _FORMULAS:
        _FORMULAS.update(_flop_formulas())
    formula = _FORMULAS.get(getattr(func, "overloadpacket", None))
    return int(formula(*args, **kwargs, out_val=out)) if formula else 0


# ---------------------------------------------------------------------------------------------------------------
# One traced training step

@dataclass(frozen=True)
class Shape:
    """What a trace depends on."""

    version: str
    dit_config: tuple        # sorted (key, value) pairs
    latent_hw: tuple[int, int]
    reference_hw: tuple        # (h, w) of each reference latent
    text_tokens: int
    rank: int
    lora_targets: tuple[str, ...]
    batch_size: int
    gradient_checkpointing: bool
    dtype: str               # "bfloat16" (autocast, as on a GPU) or "float32"
    quantized: bool = False  # block Linears as torchao's weight-only int8 runs them (``_quantize_like_torchao``)


@dataclass(frozen=True)
class Trace:
    """One traced step: bytes at its start (weights, LoRA, AdamW state), after the forward, at the peak; FLOPs."""

    weight_bytes: int        # every parameter and buffer but the LoRA's
    block_weight_bytes: int  # of those, the frozen weights of the offloaded / quantized block lists
    quantizable: int         # elements of the block Linear weights (int8 / fp8 hold them in one byte)
    quantizable_rows: int    # their output rows (one scale each)
    largest_linear: int      # elements of the largest block Linear weight (dequantized for one matmul)
    offloaded_blocks: int    # blocks in those lists
    lora_parameters: int
    start: int
    forward_end: int
    peak: int
    flops: int


def _fake_copy(model: torch.nn.Module, fake) -> None:
    """Give every meta tensor of ``model`` a fake CPU twin (parameters, buffers, plain tensor attributes such as
    rope tables): shapes and dtypes only. Assigned, not swapped: nn.Module's swap refuses fake tensors."""
    with fake:
        for module in model.modules():
            for table in (module._parameters, module._buffers):
                for name, value in list(table.items()):
                    if value is None:
                        continue
                    twin = torch.empty_strided(value.shape, value.stride(), dtype=value.dtype, device="cpu")
                    table[name] = (torch.nn.Parameter(twin, requires_grad=value.requires_grad)
                                   if isinstance(value, torch.nn.Parameter) else twin)
            for name, value in list(vars(module).items()):
                if isinstance(value, torch.Tensor) and not isinstance(value, torch.nn.Parameter):
                    setattr(module, name, torch.empty_strided(value.shape, value.stride(), dtype=value.dtype,
                                                              device="cpu"))


def _weights(dit: torch.nn.Module, offloaded: tuple[str, ...]) -> dict:
    frozen = [(n, p) for n, p in dit.named_parameters() if not p.requires_grad]
    size = sum(p.numel() * p.element_size() for _, p in frozen) + sum(b.numel() * b.element_size()
                                                                     for b in dit.buffers())
    blocks = [dit.get_submodule(name) for name in offloaded]
    block_bytes = sum(p.numel() * p.element_size() for b in blocks for p in b.parameters() if not p.requires_grad)
    linears = [m for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear)]
    return {"weight_bytes": size, "block_weight_bytes": block_bytes,
            "quantizable": sum(m.weight.numel() for m in linears),
            "quantizable_rows": sum(m.weight.shape[0] for m in linears),
            "largest_linear": max((m.weight.numel() for m in linears), default=0),
            "offloaded_blocks": sum(len(b) for b in blocks)}


def sample_tensors(shape: Shape, hidden: int, channels: int, seed: int = 0) -> list[dict]:
    """The cached samples of one micro-step, as phase 1 writes them (CPU tensors: the trace moves them in)."""
    generator = torch.Generator().manual_seed(seed)
    h, w = shape.latent_hw
    samples = []
    for _ in range(shape.batch_size):
        sample = {"target": torch.randn(channels, h, w, generator=generator),
                  "prompt_emb": torch.randn(shape.text_tokens, hidden, generator=generator)}
        for k, (rh, rw) in enumerate(shape.reference_hw):
            sample[f"ref.{k}"] = torch.randn(channels, rh, rw, generator=generator)
        samples.append(sample)
    return samples


def run_step(family, spec, dit, params, samples, dtype, gradient_checkpointing: bool, counter: LiveBytes,
             optimizer=None) -> int:
    """The trainer's micro-step on ``dit`` (objective losses under autocast, backward, clipping at 1.0 and, with
    ``optimizer``, its step) under ``counter``; returns the live bytes after the forward."""
    from .configs import FlowMatchConfig
    from .objectives import FlowMatching

    objective = FlowMatching(FlowMatchConfig(), spec)
    denoiser = family.denoiser(dit)
    denoiser.train()
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == torch.bfloat16 else nullcontext()
    with counter:
        with autocast:
            losses = objective.losses(denoiser, samples, list(range(len(samples))), torch.device("cpu"), dtype,
                                      gradient_checkpointing)
        forward_end = counter.live
        losses.mean().backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        if optimizer is not None:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
    return forward_end


def _dequantized_forward(self, x):
    """What torchao's weight-only Int8Tensor runs for a bf16 input (BENCHMARKS.md shows its ops): the weight
    dequantized to the input's dtype, one matmul, the per-row scale. The matmul keeps that bf16 copy for the
    backward, so a quantized base saves no memory while a block's backward is pending: the trace must see it."""
    shape = x.shape
    y = torch.mm(x.reshape(-1, shape[-1]), self.weight.t().to(x.dtype)) * self.scale.to(x.dtype)
    y = y.reshape(*shape[:-1], -1)
    return y + self.bias.to(x.dtype) if self.bias is not None else y


def _quantize_like_torchao(blocks: list, dtype) -> None:
    """Block Linears (peft's base layers included) with int8 weights and a per-row scale, as on the meta device."""
    import types
    for block in blocks:
        for name, module in block.named_modules():
            if type(module) is torch.nn.Linear and ".lora_" not in f".{name}":   # the LoRA's own stay trainable
                weight = module.weight
                module.weight = torch.nn.Parameter(torch.empty(weight.shape, dtype=torch.int8, device="meta"),
                                                   requires_grad=False)
                module.register_buffer("scale", torch.empty(weight.shape[0], dtype=dtype, device="meta"))
                module.forward = types.MethodType(_dequantized_forward, module)


def trace(shape: Shape) -> Trace:
    """One training step of the family's DiT at ``shape`` on fake tensors (no memory, no arithmetic)."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from .lora import inject_lora, lora_parameters

    preset = PRESETS[shape.version]
    family = FAMILIES[preset.family]
    size = family.real_size(preset)
    dtype = getattr(torch, shape.dtype)
    with torch.device("meta"):
        dit = family.dit_from_config(dict(shape.dit_config))
    dit.to(dtype)
    inject_lora(dit, shape.lora_targets, shape.rank, float(shape.rank), family)
    weights = _weights(dit, size.offloaded)
    if shape.quantized:
        _quantize_like_torchao([dit.get_submodule(name) for name in size.offloaded], dtype)
        weights["weight_bytes"] = sum(p.numel() * p.element_size() for p in dit.parameters() if not p.requires_grad) \
            + sum(b.numel() * b.element_size() for b in dit.buffers())
    # Real inputs are allowed: the timestep and noise draws are real (tiny), everything touching the DiT is fake.
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    _fake_copy(dit, fake)
    params = [p for _, p in lora_parameters(dit)]
    with fake:   # AdamW's two moments, alive from the second step on
        state = [torch.empty_like(p) for p in params for _ in range(2)]
    counter = LiveBytes()
    counter.track([*dit.parameters(), *dit.buffers(), *state])
    start = counter.live
    hidden = dict(shape.dit_config).get("joint_attention_dim", size.text_hidden)
    samples = sample_tensors(shape, hidden, size.latent_channels)
    forward_end = run_step(family, model_spec(shape.version), dit, params, samples, dtype,
                           shape.gradient_checkpointing, counter)
    return Trace(**weights, lora_parameters=sum(p.numel() for p in params), start=start,
                 forward_end=forward_end, peak=counter.peak, flops=counter.flops)


def _cache_file(shape: Shape) -> Path:
    root = Path(os.environ.get("EDITTUNER_PLAN_CACHE") or Path(os.environ.get("XDG_CACHE_HOME") or
                                                             Path.home() / ".cache") / "edittuner" / "plan")
    key = json.dumps([PLAN_FORMAT, torch.__version__, asdict(shape)], default=list, sort_keys=True)
    return root / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".json")


def cached_trace(shape: Shape) -> Trace:
    """``trace`` once per configuration: later plans (and the launchers' line) read it back."""
    from .atomic import write_json

    path = _cache_file(shape)
    try:
        return Trace(**json.loads(path.read_text(encoding="utf-8")))
    except (OSError, ValueError, TypeError):
        pass
    result = trace(shape)
    try:
        write_json(path, asdict(result))
    except OSError:   # a read-only home: plan without the cache
        pass
    return result


def extrapolated(shape: Shape, depth_min: dict, depth_real: dict) -> Trace:
    """The trace at the released depth from traces at the fewest blocks and one more of each kind: every field
    grows by the same amount per block of a kind (weights, saved activations, FLOPs)."""
    config = dict(shape.dit_config)
    base_config = {**config, **depth_min}
    base = cached_trace(replace(shape, dit_config=tuple(sorted(base_config.items()))))
    values = asdict(base)
    for key, fewest in depth_min.items():
        more = cached_trace(replace(shape, dit_config=tuple(sorted({**base_config, key: fewest + 1}.items()))))
        for name, value in asdict(more).items():
            if name != "largest_linear":
                values[name] += (depth_real[key] - fewest) * (value - asdict(base)[name])
    return Trace(**values)


# ---------------------------------------------------------------------------------------------------------------
# The plan: levers on top of the trace

GiB = 2**30


@dataclass(frozen=True)
class Levers:
    gradient_checkpointing: bool = True
    base_quantization: str = "none"
    offload_blocks: bool = False
    zero3: bool = False

    def describe(self) -> str:
        parts = [f"checkpointing {'on' if self.gradient_checkpointing else 'off'}",
                 "bf16 base" if self.base_quantization == "none" else f"{self.base_quantization} base"]
        parts += ["block offload"] * self.offload_blocks + ["ZeRO-3"] * self.zero3
        return ", ".join(parts)

    def valid(self, fp8: bool = True) -> bool:
        """What performance.check_levers accepts (fp8: whether the card runs fp8 weights)."""
        quantized = self.base_quantization != "none"
        return not ((self.offload_blocks and (quantized or not self.gradient_checkpointing))
                    or (self.zero3 and (quantized or self.offload_blocks))
                    or (self.base_quantization == "fp8" and not fp8))


@dataclass(frozen=True)
class Phase2:
    base_weights: int
    lora_optimizer: int
    activations: int
    temporaries: int
    hardware_flops: int
    step_s: float | None      # on the named card, None without one

    @property
    def peak(self) -> int:
        return self.base_weights + self.lora_optimizer + self.activations + self.temporaries

    @property
    def card_need(self) -> float:
        """Bytes of the card the run needs: the allocator's slack and the CUDA context on top of the peak."""
        return self.peak * FRAGMENTATION + CUDA_CONTEXT_BYTES


def phase2(t: Trace, levers: Levers, gpus: int, dtype_bytes: int, card=None, mfu: float = 0.4) -> Phase2:
    """Per-GPU memory of phase 2 (module docstring) and the step time on ``card`` (a configs.Card); ``t`` is the
    trace with the base as the levers have it (bf16, or quantized for int8 and fp8)."""
    base = t.weight_bytes
    per_block = t.block_weight_bytes / max(1, t.offloaded_blocks)
    temporaries = t.peak - t.forward_end
    if levers.base_quantization == "fp8":   # ``t`` is the int8 trace: torchao's fp8 scales are fp32, not bf16
        base += t.quantizable_rows * 2
    if levers.offload_blocks:
        base += (OFFLOAD_RESIDENT_BLOCKS - t.offloaded_blocks) * per_block
    lora = t.lora_parameters * 12               # fp32 parameters and AdamW's two fp32 moments
    if levers.zero3:
        base = base / gpus + ZERO3_GATHERED_BLOCKS * per_block
        lora /= gpus
    elif gpus > 1:
        temporaries += t.lora_parameters * 4    # DDP's gradient bucket
    activations = t.forward_end - t.start
    # AdamW's step (activations gone): the gradients and two fp32 temporaries per parameter of foreach AdamW.
    temporaries = max(temporaries, t.lora_parameters * 12 // (gpus if levers.zero3 else 1) - activations)
    step_s = None
    if card is not None:
        step_s = t.flops / (mfu * card.bf16_tflops * 1e12)
        step_s *= QUANT_SLOWDOWN if levers.base_quantization != "none" else 1.0
        if levers.offload_blocks:
            step_s += 2 * t.block_weight_bytes / PCIE_BYTES_PER_S
        if levers.zero3:
            step_s += 3 * t.weight_bytes * (gpus - 1) / gpus / NVLINK_BYTES_PER_S
    return Phase2(int(base), int(lora), int(activations), int(temporaries), t.flops, step_s)


def phase1(size, text_tokens: int, pixels: int, dtype_bytes: int) -> dict:
    """Phase 1's peak: both encoders' weights, the text encoder's activations for the prompt (the system prefix,
    ~64 tokens, included; hidden states, q/k/v and the MLP's three intermediates of a layer), and ~8 of the VAE
    encoder's full-resolution ``vae_width``-channel maps alive at once (a residual block's input, norm, conv
    outputs and the causal convolutions' cached frames)."""
    tokens = text_tokens + 64
    text = tokens * (8 * size.text_hidden + 3 * size.text_intermediate) * dtype_bytes
    vae = 8 * size.vae_width * pixels * dtype_bytes
    weights = (size.text_encoder_parameters + size.vae_parameters) * dtype_bytes
    return {"weights": weights, "activations": text + vae, "peak": weights + text + vae}


@dataclass(frozen=True)
class Plan:
    cfg: PlanConfig
    shape: Shape
    depth: dict
    traces: dict              # (gradient_checkpointing, quantized base) -> Trace at the released depth
    phase1: dict

    def phase2(self, levers: Levers, card=None) -> Phase2:
        dtype_bytes = 2 if self.shape.dtype == "bfloat16" else 4
        t = self.traces[(levers.gradient_checkpointing, levers.base_quantization != "none")]
        return phase2(t, levers, self.cfg.gpus, dtype_bytes, card, self.cfg.mfu)

    @property
    def levers(self) -> Levers:
        c = self.cfg
        return Levers(c.gradient_checkpointing, c.base_quantization, c.offload_blocks, c.zero3)

    def lever_sets(self, memory_bytes: float, card=None) -> list[tuple[Levers, Phase2, bool]]:
        """Every accepted lever set with its phase 2 and whether it fits ``memory_bytes``; fastest first (step
        time on ``card``, or FLOPs and transfers on an H100 when no card is named), then smallest."""
        timing = card or CARDS["H100"]
        sets = []
        for ckpt in (False, True):
            for quant in ("none", "int8", "fp8"):
                for offload in (False, True):
                    for zero3 in ((False, True) if self.cfg.gpus > 1 else (False,)):
                        levers = Levers(ckpt, quant, offload, zero3)
                        if levers.valid(fp8=card is None or card.fp8):
                            p = self.phase2(levers, timing)
                            sets.append((levers, p, p.card_need <= memory_bytes))
        return sorted(sets, key=lambda s: (s[1].step_s, s[1].peak))


def cache_shape(cache_dir: Path) -> tuple[tuple[int, int], tuple, int]:
    """The largest sample of a phase-1 cache: its target latent size, reference latent sizes, prompt length."""
    manifest = Path(cache_dir) / "manifest.json"
    try:
        records = json.loads(manifest.read_text(encoding="utf-8"))["samples"]
        shapes = [r["shapes"] for r in records]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EditTunerError(f"--cache_dir {cache_dir}: cannot read its samples' shapes from {manifest} ({exc}); "
                             "run `edittuner precompute` first, or give --resolution instead") from None
    if not shapes:
        raise EditTunerError(f"--cache_dir {cache_dir}: the cache holds no samples; give --resolution instead")

    def size(s):
        refs = [s[k] for k in sorted(s) if k.startswith("ref.")]
        return (sum(x[-1] * x[-2] for x in [s["target"], *refs]), s["prompt_emb"][0])
    largest = max(shapes, key=size)
    refs = tuple(tuple(largest[k][-2:]) for k in sorted(largest) if k.startswith("ref."))
    return tuple(largest["target"][-2:]), refs, int(largest["prompt_emb"][0])


def make_plan(cfg: PlanConfig) -> Plan:
    preset = PRESETS[cfg.model_version]
    family = FAMILIES[preset.family]
    size = family.real_size(preset)
    if cfg.cache_dir is not None:
        latent_hw, reference_hw, tokens = cache_shape(cfg.cache_dir)
        tokens = cfg.text_tokens or tokens
    else:
        side = cfg.resolution // 8
        latent_hw, reference_hw = (side, side), ((side, side),) * cfg.references
        tokens = cfg.text_tokens or family.plan_text_tokens(preset, cfg.references)
    dtype = "bfloat16" if cfg.mixed_precision == "bf16" else "float32"
    config = tuple(sorted(size.dit_config.items()))
    traces = {}
    for ckpt in (False, True):
        for quantized in (False, True):
            shape = Shape(cfg.model_version, config, latent_hw, reference_hw, tokens, cfg.rank, cfg.lora_targets,
                          cfg.batch_size, ckpt, dtype, quantized)
            traces[(ckpt, quantized)] = extrapolated(shape, size.depth, {k: size.dit_config[k] for k in size.depth})
    pixels = latent_hw[0] * latent_hw[1] * 64
    return Plan(cfg, replace(shape, gradient_checkpointing=cfg.gradient_checkpointing, quantized=False),
                dict(size.depth), traces,
                phase1(size, tokens, pixels, 2 if dtype == "bfloat16" else 4))


# ---------------------------------------------------------------------------------------------------------------
# Output

def _gib(n: float) -> str:
    return f"{n / GiB:.1f} GiB"


def _seconds(s: float) -> str:
    return f"{s:.2f} s" if s < 100 else f"{s:.0f} s"


def card_memory(cfg: PlanConfig) -> tuple[float | None, object]:
    """Bytes of the card the plan checks against (GB as cards are sold: an "80 GB" card holds 80 GiB) and the
    named card (None for --gpu_memory alone)."""
    if cfg.card:
        return CARDS[cfg.card].memory_gb * GiB, CARDS[cfg.card]
    return (cfg.gpu_memory * GiB if cfg.gpu_memory else None), None


def describe_run(plan: Plan) -> str:
    s, c = plan.shape, plan.cfg
    h, w = s.latent_hw
    refs = ", ".join(f"{rh * 8}x{rw * 8}" for rh, rw in s.reference_hw) or "none"
    return (f"{PRESETS[c.model_version].base_model} (--model_version {c.model_version}): target {w * 8}x{h * 8}, "
            f"references {refs}, {s.text_tokens} text tokens, LoRA rank {s.rank}, batch {s.batch_size}, "
            f"{'bf16' if s.dtype == 'bfloat16' else 'fp32'}, {c.gpus} GPU(s)")


def render(plan: Plan) -> str:
    cfg = plan.cfg
    memory, card = card_memory(cfg)
    levers = plan.levers
    p = plan.phase2(levers, card)
    depth = ", ".join(f"{k} {v} and {v + 1}" for k, v in plan.depth.items())
    lines = [f"plan: {describe_run(plan)}",
             f"method: one training step traced on fake tensors ({depth}), extrapolated to the released depth; "
             "levers by arithmetic (README 'Will it fit?')",
             f"phase 2 per GPU ({levers.describe()}):",
             f"  base weights        {_gib(p.base_weights):>10}",
             f"  LoRA + optimizer    {_gib(p.lora_optimizer):>10}   ({plan.traces[(True, False)].lora_parameters / 1e6:.1f} M "
             "fp32 parameters + AdamW's two moments)",
             f"  activations         {_gib(p.activations):>10}   (kept by the forward for the backward)",
             f"  temporaries         {_gib(p.temporaries):>10}   (gradients, the backward's working tensors)",
             f"  peak allocated      {_gib(p.peak):>10}   card needs {_gib(p.card_need)} (x{FRAGMENTATION} "
             f"allocator slack + {CUDA_CONTEXT_BYTES / GB:.0f} GB CUDA context)",
             f"phase 1 per GPU: {_gib(plan.phase1['peak'])} (text encoder + VAE weights "
             f"{_gib(plan.phase1['weights'])}, activations {_gib(plan.phase1['activations'])})",
             f"step FLOPs (matmuls and attention, as executed with fused attention): "
             f"{plan.traces[(False, False)].flops / 1e12:.1f} TFLOP without checkpointing, "
             f"{plan.traces[(True, False)].flops / 1e12:.1f} TFLOP with it (one more forward of the blocks)",
             f"time per step at {cfg.mfu:.0%} of the dense bf16 peak: " + ", ".join(
                 f"{name} {_seconds(plan.phase2(levers, c).step_s)}" for name, c in CARDS.items())]
    if memory is not None:
        name = f"{cfg.card} ({card.memory_gb:g} GB)" if card else f"{cfg.gpu_memory:g} GB"
        sets = plan.lever_sets(memory, card)
        timed_on = cfg.card or "H100 (for the order)"
        lines.append(f"lever sets on {name}, fastest first (step time on {timed_on}):")
        for lv, ph, fits in sets:
            lines.append(f"  {'fits ' if fits else 'no   '} {lv.describe():<52} needs {_gib(ph.card_need):>10}"
                         f"   {_seconds(ph.step_s)}/step")
        if not any(f for _, _, f in sets):
            lines.append("  nothing fits: lower the resolution, use more GPUs with ZeRO-3 (--gpus N --zero3), or a "
                         "larger card")
    return "\n".join(lines)


def brief(plan: Plan) -> str:
    """One line: the planned peak of phase 2 with these levers, and whether it fits this machine's GPU."""
    p = plan.phase2(plan.levers, CARDS["H100"])
    line = (f"plan: phase 2 needs ~{_gib(p.card_need)} per GPU (base {_gib(p.base_weights)}, LoRA+optimizer "
            f"{_gib(p.lora_optimizer)}, activations {_gib(p.activations)}, temporaries {_gib(p.temporaries)}; "
            f"{plan.levers.describe()}); {p.hardware_flops / 1e12:.0f} TFLOP/step")
    if torch.cuda.is_available():
        total = torch.cuda.get_device_properties(0).total_memory
        line += (f"; this GPU has {_gib(total)}: " + ("fits" if p.card_need <= total else
                 "will NOT fit: `edittuner plan --gpu_memory ...` lists lever sets that do"))
    return line


def main(cfg: PlanConfig) -> str:
    return brief(make_plan(cfg)) if cfg.brief else render(make_plan(cfg))
