"""Who runs phase 2: accelerate (one device, DDP) or DeepSpeed ZeRO, behind the few calls the train loop makes.

DeepSpeed is driven directly (``deepspeed.init_distributed`` + ``deepspeed.initialize``) rather than through
accelerate's DeepSpeed plugin: the plugin does not initialise distributed on a machine without a GPU, and one
code path that runs on CPU over gloo is one we can test. A run uses DeepSpeed when ``--deepspeed_config`` names
a DeepSpeed JSON, or when ``accelerate launch`` was given one of our ZeRO configs (it exports
``ACCELERATE_USE_DEEPSPEED`` and ``ACCELERATE_DEEPSPEED_CONFIG_FILE``).

Under ZeRO-3 every parameter, LoRA included, is partitioned across ranks: reading the LoRA (checkpoints, the
final file) happens inside ``gathered(params)`` on every rank, and only rank 0 writes.
"""

from __future__ import annotations

import json
import os
import shutil
from contextlib import nullcontext
from pathlib import Path
from typing import Callable

import torch

from .checkpoint import load_state, save_state
from .errors import EditTunerError


def deepspeed_config_from_env() -> str | None:
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "").lower() in ("1", "true"):
        path = os.environ.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if not path:
            raise EditTunerError("accelerate was launched with DeepSpeed but without a config file; use "
                                 "accelerate_configs/zero3.yaml (it names accelerate_configs/zero3.json)")
        return path
    return None


def resolve_deepspeed_config(path: str | os.PathLike, gradient_accumulation: int, bf16: bool,
                             max_grad_norm: float) -> dict:
    """Read a DeepSpeed JSON and fill the values this run decides (accelerate's "auto" convention)."""
    try:
        config = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise EditTunerError(f"--deepspeed_config {path}: cannot read it as JSON ({exc})") from None
    zero = config.get("zero_optimization", {})
    if not isinstance(zero, dict) or zero.get("stage") != 3:
        raise EditTunerError(f"--deepspeed_config {path}: zero_optimization.stage must be 3 (ZeRO-3 is what edittuner "
                             "drives and checkpoints; use accelerate_configs/ddp.yaml for plain data parallel)")
    auto = {"train_micro_batch_size_per_gpu": 1, "gradient_accumulation_steps": gradient_accumulation}
    for key, value in auto.items():
        if config.get(key, "auto") == "auto":
            config[key] = value
        elif config[key] != value:
            raise EditTunerError(f"--deepspeed_config {path}: {key} is {config[key]}, but this run uses {value}; "
                                 f"set it to \"auto\"")
    config.pop("train_batch_size", None)  # derived by DeepSpeed from the two above and the world size
    if config.get("bf16", {}).get("enabled") == "auto":
        config["bf16"]["enabled"] = bf16
    if config.get("gradient_clipping", "auto") == "auto":
        config["gradient_clipping"] = max_grad_norm
    elif max_grad_norm and config["gradient_clipping"] != max_grad_norm:
        raise EditTunerError(f"--max_grad_norm {max_grad_norm} disagrees with gradient_clipping "
                             f"{config['gradient_clipping']} in {path}; set one of them")
    # The optimizer is ours (AdamW from torch, or edittuner.prodigy.GlobalProdigy); DeepSpeed only shards its state.
    config.setdefault("zero_allow_untested_optimizer", True)
    config.setdefault("steps_per_print", 10 ** 9)
    return config


class DeepSpeedRuntime:
    """The subset of ``accelerate.Accelerator`` the train loop uses, on a DeepSpeed engine."""

    def __init__(self, config: dict):
        import deepspeed

        self.cuda = torch.cuda.is_available()
        if not torch.distributed.is_initialized():
            deepspeed.init_distributed(dist_backend="nccl" if self.cuda else "gloo", verbose=False)
        self.process_index = torch.distributed.get_rank()
        self.num_processes = torch.distributed.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", self.process_index))
        self.device = torch.device("cuda", local) if self.cuda else torch.device("cpu")
        if self.cuda:
            torch.cuda.set_device(self.device)
        self.is_main_process = self.process_index == 0
        self.config = config
        self.zero_stage = self.config["zero_optimization"]["stage"]
        self.engine = None

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        import deepspeed

        self.engine, ds_optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=self.config)
        if hasattr(optimizer, "bind_zero"):   # GlobalProdigy: its statistics span the ranks' partitions
            optimizer.bind_zero(ds_optimizer)
        return self.engine, ds_optimizer

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already divided by the accumulation count; the engine only reduces and steps at the boundary.
        self.engine.backward(loss, scale_wrt_gas=False)
        self.engine.step()

    def optimizer_step(self, optimizer) -> None:
        """The engine stepped in backward() at the accumulation boundary."""

    def clip_grad_norm(self, params, max_norm: float) -> float | None:
        """Clipping is the engine's (gradient_clipping in the config); report the norm it measured."""
        norm = self.engine.get_global_grad_norm()
        return None if norm is None else float(norm)

    def no_sync(self, model):
        return nullcontext()

    def autocast(self):
        return nullcontext()  # the engine casts the module itself when bf16 is on

    def reduce(self, tensor: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        tensor = tensor.clone()
        torch.distributed.all_reduce(tensor)
        return tensor / self.num_processes if reduction == "mean" else tensor

    def wait_for_everyone(self) -> None:
        torch.distributed.barrier()

    def gathered(self, params: list[torch.nn.Parameter], modify: bool = False):
        """The full parameters on every rank inside the block (ZeRO-3 partitions them); ``modify``: what rank 0
        writes into them is broadcast and partitioned again on exit (the other ranks' writes are dropped)."""
        if self.zero_stage != 3:
            return nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters(params, modifier_rank=0 if modify else None)

    def save_optimizer(self, optimizer, staging: Path) -> Callable[[Path], None]:
        """Every rank writes its shard to ``staging`` now; the returned function (main process) moves the shards
        into the checkpoint's folder, so the checkpoint still appears in one rename."""
        if self.is_main_process:
            shutil.rmtree(staging, ignore_errors=True)
            staging.mkdir(parents=True)
        self.wait_for_everyone()
        save_state(staging, f"optimizer.rank{self.process_index}", self._optimizer_shard(optimizer))
        self.wait_for_everyone()

        def move_into(folder: Path) -> None:
            for shard in sorted(staging.iterdir()):
                os.replace(shard, folder / shard.name)
        return move_into

    def load_optimizer(self, optimizer, folder: Path, restore_weights: Callable[[], None]) -> None:
        """Each rank's shard holds its fp32 master partition too: loading it restores the LoRA exactly."""
        shard = load_state(folder, f"optimizer.rank{self.process_index}")
        state = {**optimizer.state_dict(), **shard}
        # DeepSpeed takes one state per rank and reads its own; it also copies the fp32 partitions into the model.
        optimizer.load_state_dict([state] * self.num_processes)

    def _optimizer_shard(self, optimizer) -> dict:
        """This rank's part of the ZeRO optimizer: the inner optimizer's state on its flat partition and the fp32
        master partition (which is also the LoRA's exact value). The rest of DeepSpeed's state_dict is config
        (stage, loss scaler) that a resumed run rebuilds identically, and not all of it is plain data."""
        state = optimizer.state_dict()
        return {"optimizer_state_dict": state["optimizer_state_dict"], "fp32_flat_groups": state["fp32_flat_groups"]}


class AccelerateRuntime:
    """accelerate's Accelerator (one device or DDP), behind the same calls as DeepSpeedRuntime."""

    zero_stage = None

    def __init__(self, mixed_precision: str, cpu: bool):
        from accelerate import Accelerator

        self.accelerator = Accelerator(mixed_precision=mixed_precision, cpu=cpu)
        self.process_index = self.accelerator.process_index
        self.num_processes = self.accelerator.num_processes
        self.is_main_process = self.accelerator.is_main_process
        self.device = self.accelerator.device

    def prepare(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer):
        return self.accelerator.prepare(model, optimizer)

    def backward(self, loss: torch.Tensor) -> None:
        self.accelerator.backward(loss)

    def optimizer_step(self, optimizer) -> None:
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def clip_grad_norm(self, params, max_norm: float) -> float | None:
        return float(self.accelerator.clip_grad_norm_(params, max_norm)) if max_norm > 0 else None

    def no_sync(self, model):
        return self.accelerator.no_sync(model)

    def autocast(self):
        return self.accelerator.autocast()

    def reduce(self, tensor: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
        return self.accelerator.reduce(tensor, reduction)

    def wait_for_everyone(self) -> None:
        self.accelerator.wait_for_everyone()

    def gathered(self, params, modify: bool = False):
        return nullcontext()

    def save_optimizer(self, optimizer, staging: Path) -> Callable[[Path], None]:
        """The whole optimizer, read now (inside the caller's weight view); the main process writes it into the
        checkpoint's folder with the returned function (``staging`` is not needed: every rank holds it all)."""
        state = optimizer.state_dict()
        return lambda folder: save_state(folder, "optimizer", state)

    def load_optimizer(self, optimizer, folder: Path, restore_weights: Callable[[], None]) -> None:
        restore_weights()
        optimizer.load_state_dict(load_state(folder, "optimizer"))
