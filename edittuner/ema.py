"""An exponential moving average of the LoRA weights (`--ema_decay`), kept beside training.

The average follows diffusers' ``EMAModel`` with its defaults (what SimpleTuner's EMA users know): the k-th
update uses decay_k = min(decay, (1 + j) / (10 + j)) with j = k - 1, and decay_1 = 0, so the average starts at
the weights after the first update rather than at the untrained LoRA (lora_B = 0), which a plain EMA over a short
run would drag back towards "no edit". Update: ema -= (1 - decay_k) * (ema - weights), every ``every`` optimizer
steps. The average is of the full (gathered) LoRA; every process keeps the same copy, so previews can run it on
every rank, as they run the training weights.
"""

from __future__ import annotations

import torch

from .lora import lora_file_state


class LoraEMA:
    def __init__(self, named_params: list[tuple[str, torch.Tensor]], decay: float, every: int, device):
        self.names = [name for name, _ in named_params]
        self.decay, self.every, self.device = decay, every, torch.device(device)
        self.updates = 0
        self.shadow = [p.detach().to(self.device, torch.float32, copy=True) for _, p in named_params]

    def decay_at(self, update: int) -> float:
        """The decay of update number ``update`` (1-based), as diffusers' EMAModel.get_decay without warm-up."""
        j = update - 1
        return 0.0 if j <= 0 else min(self.decay, (1 + j) / (10 + j))

    def due(self, step: int) -> bool:
        """Whether optimizer step ``step`` (1-based) updates the average."""
        return step % self.every == 0

    @torch.no_grad()
    def update(self, params: list[torch.Tensor]) -> None:
        self.updates += 1
        one_minus = 1.0 - self.decay_at(self.updates)
        for shadow, param in zip(self.shadow, params):
            value = param.detach().to(self.device, torch.float32)
            if one_minus == 1.0:   # decay 0: the weights themselves (s - (s - w) can be off by a rounding)
                shadow.copy_(value)
            else:
                shadow.sub_(one_minus * (shadow - value))

    @torch.no_grad()
    def copy_to(self, params: list[torch.Tensor]) -> None:
        for shadow, param in zip(self.shadow, params):
            param.data.copy_(shadow.to(param.device, param.dtype))

    def reset(self, params: list[torch.Tensor]) -> None:
        """Start again from ``params`` (a resume that turns the EMA on)."""
        self.updates = 0
        self.shadow = [p.detach().to(self.device, torch.float32, copy=True) for p in params]

    def file_state(self, rank: int, alpha: float) -> dict[str, torch.Tensor]:
        """The average in the LoRA file format (what lora_ema.safetensors holds)."""
        return lora_file_state(zip(self.names, self.shadow), rank, alpha)

    def state_dict(self) -> dict:
        """Exact state for a checkpoint (unscaled fp32, so a resume continues bitwise)."""
        return {"updates": self.updates, "decay": self.decay, "shadow": [s.cpu() for s in self.shadow]}

    def load_state_dict(self, state: dict) -> None:
        if len(state["shadow"]) != len(self.shadow) or any(
                a.shape != b.shape for a, b in zip(state["shadow"], self.shadow)):
            raise ValueError("the EMA state does not match this LoRA")
        self.updates = int(state["updates"])
        self.shadow = [s.to(self.device, torch.float32) for s in state["shadow"]]
