"""Speed and memory levers for the DiT: the attention kernel, ``torch.compile`` of its blocks (``Family.blocks``), a
low-memory (int8 / fp8) frozen base under the bf16 LoRA, and block-level CPU offload of the frozen weights.

Each lever is one field of ``PerformanceConfig`` (configs.py; CLI flags ``--attention``, ``--compile``,
``--base_quantization``, ``--offload_blocks``; launcher variables of the same names in capitals).
``check_levers`` (``PerformanceConfig.check``) refuses a combination that cannot run where the run is, with the
reason and the way out, before any model is loaded. ``place_dit`` puts the DiT on the device with the levers
applied, in the order they need: quantize and offload work block by block from host memory, so the bf16 base
never has to fit on the card in one piece.
"""

from __future__ import annotations

import warnings
from contextlib import contextmanager

import torch

from .configs import PerformanceConfig
from .errors import EditTunerError


def check_levers(cfg: PerformanceConfig, device: torch.device, dtype: torch.dtype, *, zero_stage: int | None = None,
                 batch_size: int = 1, gradient_checkpointing: bool = True) -> None:
    """Refuse what cannot run on this device / with these settings, naming the lever and the way out."""
    cuda = device.type == "cuda"
    if cfg.attention in ("efficient", "cudnn") and not cuda:
        raise EditTunerError(f"--attention {cfg.attention}: this SDPA kernel runs on CUDA GPUs only and this run "
                             "is on the CPU; use --attention auto (or flash / math)")
    if cfg.attention == "cudnn" and cuda and torch.cuda.get_device_capability(device) < (9, 0):
        raise EditTunerError("--attention cudnn: the cuDNN attention kernel needs a Hopper GPU (sm90) or newer; "
                             "use --attention flash or auto")
    if cfg.attention == "flash" and cuda and dtype not in (torch.bfloat16, torch.float16):
        raise EditTunerError(f"--attention flash: the flash kernel takes bf16/fp16 on a GPU, and this run is "
                             f"{dtype}; use --mixed_precision bf16 (or auto), or --attention auto")
    if cfg.attention in ("flash", "cudnn") and batch_size > 1:
        raise EditTunerError(f"--attention {cfg.attention} with --batch_size {batch_size}: samples in a batch "
                             "whose prompts differ in length need an attention mask, which this kernel does not "
                             "take; use --attention auto / efficient / math, or --batch_size 1")
    if cfg.base_quantization != "none" and zero_stage:
        raise EditTunerError(f"--base_quantization {cfg.base_quantization} under DeepSpeed ZeRO-{zero_stage}: "
                             "ZeRO partitions plain tensors, not quantized ones; use accelerate_configs/ddp.yaml "
                             "or a single process with a quantized base")
    if cfg.base_quantization == "fp8":
        if not cuda:
            raise EditTunerError("--base_quantization fp8: fp8 weights need a CUDA GPU (compute capability 8.9 or "
                                 "newer: Ada, Hopper); this run is on the CPU. Use --base_quantization int8 here, "
                                 "or none")
        if torch.cuda.get_device_capability(device) < (8, 9):
            name = torch.cuda.get_device_name(device)
            raise EditTunerError(f"--base_quantization fp8: {name} has no fp8 support (needs compute capability "
                                 "8.9 or newer: Ada, Hopper); use --base_quantization int8")
    if cfg.base_quantization != "none":
        _torchao()
    if cfg.compile and zero_stage:
        raise EditTunerError(f"--compile under DeepSpeed ZeRO-{zero_stage}: ZeRO gathers each block's weights with "
                             "hooks a compiled block would trace through; use accelerate_configs/ddp.yaml or a "
                             "single process with --compile")
    if cfg.offload_blocks:
        if not cuda:
            raise EditTunerError("--offload_blocks: block offload keeps the frozen weights in host memory and "
                                 "copies each block to the GPU as it runs; this run is on the CPU, where the "
                                 "weights already are. Drop the flag")
        if zero_stage:
            raise EditTunerError(f"--offload_blocks under DeepSpeed ZeRO-{zero_stage}: ZeRO manages the weights "
                                 "itself; use accelerate_configs/zero3_offload.yaml for ZeRO's own CPU offload, or "
                                 "drop ZeRO")
        if not gradient_checkpointing:
            raise EditTunerError("--offload_blocks needs --gradient_checkpointing on: without it every block's "
                                 "weights are held for the backward pass and nothing is saved")
        if cfg.base_quantization != "none":
            raise EditTunerError(f"--offload_blocks with --base_quantization {cfg.base_quantization}: the two are "
                                 "not combined; pick one (int8 halves the base on the card, offload keeps only "
                                 "two blocks there)")
        if cfg.compile:
            raise EditTunerError("--offload_blocks with --compile: the offload hooks move weights between devices, "
                                 "which a compiled graph cannot follow; pick one")


# ---------------------------------------------------------------------------------------------------------------
# Attention

@contextmanager
def attention_backend(name: str):
    """Run the engine's joint attention with kernel ``name``. It must wrap backward too: under gradient
    checkpointing the blocks run again there, and a recompute on another kernel would not match the saved graph."""
    if name == "auto":
        yield
        return
    import diffsynth.models.qwen_image_dit as engine_dit
    from torch.nn.attention import SDPBackend, sdpa_kernel

    kernels = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
               "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    saved = engine_dit.FLASH_ATTN_3_AVAILABLE
    engine_dit.FLASH_ATTN_3_AVAILABLE = False  # the engine's switch between FA3 and SDPA
    try:
        if name == "sdpa":
            yield
        else:
            with sdpa_kernel([kernels[name]]):
                yield
    finally:
        engine_dit.FLASH_ATTN_3_AVAILABLE = saved


# ---------------------------------------------------------------------------------------------------------------
# torch.compile

def compile_blocks(blocks: list[torch.nn.Module]) -> None:
    """Compile each of the DiT's blocks (``Family.blocks``) in place (``Module.compile``: the state-dict keys and
    the LoRA modules stay where they are). Dynamo inlines the block's parameters as graph inputs, so the 60
    identical blocks share one compiled graph per input shape instead of 60."""
    for block in blocks:
        block.compile(dynamic=None)


# ---------------------------------------------------------------------------------------------------------------
# int8 / fp8 base

def _torchao():
    try:
        import torchao.quantization as quantization
    except ImportError:
        raise EditTunerError("--base_quantization needs torchao (pip install -e . installs it)") from None
    return quantization


def quantize_base(blocks: list[torch.nn.Module], precision: str, device: torch.device) -> None:
    """Quantize the frozen Linear weights of every block of the DiT (``Family.blocks``; weight-only: activations
    and the LoRA stay in the compute dtype), one block at a time on ``device``: the bf16 base never sits on the
    card whole."""
    quantization = _torchao()
    config = {"int8": quantization.Int8WeightOnlyConfig, "fp8": quantization.Float8WeightOnlyConfig}[precision]()
    for block in blocks:
        block.to(device)
        quantization.quantize_(block, config)


def quantized_bytes(module: torch.nn.Module) -> int:
    """Bytes the module's parameters and buffers hold, counting a quantized tensor by its data and scales."""
    def nbytes(t: torch.Tensor) -> int:
        if type(t) in (torch.Tensor, torch.nn.Parameter):
            return t.numel() * t.element_size()
        names, _ = t.__tensor_flatten__()
        return sum(nbytes(getattr(t, n)) for n in names)
    return sum(nbytes(p) for p in module.parameters()) + sum(nbytes(b) for b in module.buffers())


# ---------------------------------------------------------------------------------------------------------------
# Block offload

def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


class BlockOffload:
    """Frozen weights of each transformer block live in host memory (pinned on CUDA); a block's are copied to
    ``device`` just before it runs and dropped after, so the card holds the LoRA, the small input/output layers
    and at most two blocks.

    Under gradient checkpointing a block runs twice: in the forward pass (copied in, dropped after) and again in
    the backward pass, where its recomputed graph refers to the weights until its own backward is done. Blocks
    are recomputed last to first, and a block's output feeds only the next block, so when block i is recomputed
    the backward of block i+1 has finished: its weights are dropped then.
    """

    def __init__(self, blocks: list[torch.nn.Module], device: torch.device):
        self.device = torch.device(device)
        self.pin = self.device.type == "cuda"
        self.host: dict[int, list[tuple[torch.nn.Parameter, torch.Tensor]]] = {}
        self.resident: set[int] = set()
        self.max_resident = 0
        self.copies = 0
        for index, block in enumerate(blocks):
            frozen = []
            for param in block.parameters():
                if param.requires_grad:
                    param.data = param.data.to(self.device)
                    continue
                host = param.data.to("cpu").contiguous()
                frozen.append((param, host.pin_memory() if self.pin else host))
                param.data = torch.empty(0, device=self.device, dtype=param.dtype)
            for buffer_name, buffer in block.named_buffers():
                module_name, _, name = buffer_name.rpartition(".")
                owner = block.get_submodule(module_name) if module_name else block
                owner._buffers[name] = buffer.to(self.device)
            self.host[index] = frozen
            block.register_forward_pre_hook(self._before(index))
            block.register_forward_hook(self._after(index))

    def _load(self, index: int) -> None:
        if index in self.resident:
            return
        for param, host in self.host[index]:
            # copy=True: on the CPU (tests) a .to() to the same device would alias the host copy
            param.data = host.to(self.device, non_blocking=self.pin, copy=True)
        self.resident.add(index)
        self.copies += 1
        self.max_resident = max(self.max_resident, len(self.resident))

    def _drop(self, index: int) -> None:
        for param, _ in self.host[index]:
            param.data = torch.empty(0, device=self.device, dtype=param.dtype)
        self.resident.discard(index)

    def _before(self, index: int):
        def hook(module, args):
            for other in list(self.resident - {index}):
                self._drop(other)
            self._load(index)
        return hook

    def _after(self, index: int):
        def hook(module, args, output):
            if not _in_backward():  # a recompute keeps the weights for the block's own backward
                self._drop(index)
        return hook

    def release(self) -> None:
        """Drop whatever is still on the device (the first block, after a backward pass)."""
        for index in list(self.resident):
            self._drop(index)


def place_dit(dit: torch.nn.Module, blocks: list[torch.nn.Module], cfg: PerformanceConfig,
              device: torch.device) -> BlockOffload | None:
    """Move the DiT (with its LoRA injected) to ``device`` with the levers applied to its ``blocks``
    (``Family.blocks(dit)``). Quantization must come before LoRA injection (peft wraps the quantized Linear), so
    it is done by ``prepare_base``; this is the rest."""
    offload = None
    if cfg.offload_blocks:
        offload = BlockOffload(blocks, device)
    dit.to(device)
    if cfg.compile:
        compile_blocks(blocks)
    return offload


def prepare_base(blocks: list[torch.nn.Module], cfg: PerformanceConfig, device: torch.device) -> None:
    """Before LoRA injection: quantize the frozen base's ``blocks`` (``Family.blocks(dit)``) one by one on
    ``device``."""
    if cfg.base_quantization != "none":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            quantize_base(blocks, cfg.base_quantization, device)


def load_device(cfg: PerformanceConfig, device: torch.device) -> torch.device:
    """Where to load the DiT's weights: host memory when a lever moves them to the card block by block."""
    return torch.device("cpu") if cfg.offload_blocks or cfg.base_quantization != "none" else device
