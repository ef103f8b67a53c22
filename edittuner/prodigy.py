"""ProdigyPlusScheduleFree with one d under DeepSpeed ZeRO-3: the package's optimizer, a thin subclass.

The package (prodigyplus 2.0) is written per parameter: each step it visits every parameter, adds that parameter's
share to Prodigy's two running sums (the d numerator, ``dot(grad, p0 - p)`` over every 11th element, and the d
denominator, the sum of ``|s|`` over the same elements), scales each update by its own RMS (StableAdamW) and, after
the last parameter, turns the sums into d. Under ZeRO-3 DeepSpeed hands the optimizer one flat fp32 partition per
sub-group instead (``step()`` once per sub-group, with only that partition in the param group), so unchanged each
rank would build d from its shard, sample every 11th element of its partition rather than of each parameter, and
take the RMS of its partition. Here, once ``bind_zero`` has the layout of the partitions:

- the two running sums are all-reduced (SUM) over the data-parallel group before d is computed, so every rank
  holds the same d, the one a single process would;
- the sampled elements are those at every 11th index *of each parameter* (offsets from the partition layout,
  DeepSpeed's per-parameter padding left out), as in a single process;
- the StableAdamW RMS is per parameter: each rank's squared sums per parameter, all-reduced in one call;
- d is updated once per optimizer step however many sub-groups DeepSpeed steps;
- ``eval()``/``train()`` (schedule-free's averaged and training weights) act on every rank's fp32 partition and
  copy it into the model's partitions, so a gathered read sees the averaged LoRA.

What remains per partition is the second moment: a flat partition is not a matrix, so it is per element there
(``--prodigy_factored`` has no effect under ZeRO). Everything else in the package is elementwise.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from prodigyplus.prodigy_plus_schedulefree import ProdigyPlusScheduleFree


@dataclass
class PartitionLayout:
    """Where each parameter's share sits in one rank's flat partition."""

    slot: torch.Tensor        # per element: its parameter's index (padding: the last slot, never reduced)
    numel: torch.Tensor       # per parameter: its full element count (all ranks), then 1 for the padding slot
    first: torch.Tensor       # per element: its index within its parameter (padding: -1)
    sliced: dict = field(default_factory=dict)   # slice_p -> element indices sampled (every slice_p-th per parameter)

    def sampled(self, slice_p: int) -> torch.Tensor:
        if slice_p not in self.sliced:
            self.sliced[slice_p] = torch.nonzero((self.first >= 0) & (self.first % slice_p == 0)).flatten()
        return self.sliced[slice_p]


def partition_layout(params: list, rank: int, device: torch.device) -> PartitionLayout:
    """The layout of ``rank``'s flat partition of ``params`` (DeepSpeed ZeRO-3 parameters, in sub-group order):
    each parameter contributes ``ds_tensor.ds_numel`` elements, its elements [rank * that, ...) up to its end."""
    slots, firsts, numels = [], [], []
    for i, p in enumerate(params):
        share = p.ds_tensor.ds_numel
        start = rank * share
        valid = max(0, min(share, p.ds_numel - start))
        slots.append(torch.cat([torch.full((valid,), i), torch.full((share - valid,), len(params))]))
        firsts.append(torch.cat([torch.arange(start, start + valid), torch.full((share - valid,), -1)]))
        numels.append(p.ds_numel)
    return PartitionLayout(slot=torch.cat(slots).to(device), first=torch.cat(firsts).to(device),
                           numel=torch.tensor(numels + [1], dtype=torch.float32, device=device))


class GlobalProdigy(ProdigyPlusScheduleFree):
    """ProdigyPlusScheduleFree; after ``bind_zero`` its statistics span every rank's partition (module docstring).
    Without ZeRO it is the package's optimizer unchanged."""

    def __init__(self, params, **kwargs):
        super().__init__(params, **kwargs)
        self.zero = None            # the DeepSpeed ZeRO-3 optimizer wrapping this one, once bound
        self.layouts: dict[int, PartitionLayout] = {}
        self.layout: PartitionLayout | None = None   # that of the partition being stepped

    def bind_zero(self, zero_optimizer) -> None:
        """Called with DeepSpeed's ZeRO-3 optimizer after ``deepspeed.initialize``: learn its partitions."""
        if len(self.param_groups) != 1:
            raise ValueError("GlobalProdigy under ZeRO expects the one parameter group edittuner builds")
        self.zero, self.dp_group = zero_optimizer, zero_optimizer.dp_process_group
        rank = dist.get_rank(group=self.dp_group)
        for sub_group, flat in zip(zero_optimizer.fp16_groups, zero_optimizer.fp32_partitioned_groups_flat):
            self.layouts[id(flat)] = partition_layout(sub_group, rank, flat.device)

    def load_state_dict(self, state_dict):
        """torch casts loaded floating-point state to its parameter's dtype, but the package keeps Prodigy's p0 and s
        in bf16 (and accumulates s there): put the saved dtypes back, so a resumed run continues bitwise."""
        super().load_state_dict(state_dict)
        ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        params = [p for group in self.param_groups for p in group["params"]]
        for saved_id, p in zip(ids, params):
            for key, value in state_dict["state"].get(saved_id, {}).items():
                now = self.state[p].get(key)
                if torch.is_tensor(value) and torch.is_tensor(now) and now.dtype != value.dtype:
                    self.state[p][key] = now.to(value.dtype)

    # -- one d ------------------------------------------------------------------------------------------------------

    def on_start_step(self):
        # DeepSpeed calls step() once per sub-group: d is due after the last of them, not after each.
        if self.zero is not None and not self.parameters_to_process:
            self.parameters_to_process = len(self.layouts)
        super().on_start_step()

    @torch.no_grad()
    def step_param(self, p, group):
        self.layout = self.layouts.get(id(p)) if self.zero is not None else None
        try:
            super().step_param(p, group)
        finally:
            self.layout = None

    @torch.no_grad()
    def update_d_stats_and_reset(self, group):
        if self.zero is not None:
            numerator, denom = self.get_running_values_for_group(group)
            both = torch.stack([numerator, denom])
            dist.all_reduce(both, group=self.dp_group)
            numerator.copy_(both[0])
            denom.copy_(both[1])
        super().update_d_stats_and_reset(group)

    @torch.no_grad()
    def get_sliced_tensor(self, tensor, slice_p=11):
        if self.layout is None:
            return super().get_sliced_tensor(tensor, slice_p)
        return tensor.ravel()[self.layout.sampled(slice_p)]

    def rms_clip_(self, tensor):
        if self.layout is None:
            return super().rms_clip_(tensor)
        # The package's rule (scale by rsqrt(max(1, RMS))) with each parameter's RMS over all its ranks.
        layout = self.layout
        squares = torch.zeros(len(layout.numel), dtype=tensor.dtype, device=tensor.device)
        squares.index_add_(0, layout.slot, tensor.ravel().square())
        squares[-1] = 0
        dist.all_reduce(squares, group=self.dp_group)
        rms = (squares / layout.numel).sqrt().clamp_min(1.0)
        return tensor.mul_(rms.rsqrt()[layout.slot].view_as(tensor))

    # -- schedule-free views ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def set_train_mode(self, train):
        if self.zero is None:
            return super().set_train_mode(train)
        # Outside its step DeepSpeed leaves the param groups empty: put every fp32 partition in for the switch.
        self.zero._set_fp32_optimizer_param_groups()
        try:
            super().set_train_mode(train)
        finally:
            self.zero._clear_fp32_optimizer_param_groups()
        self._copy_into_model()

    def weights(self, params: list[torch.Tensor]) -> list[torch.Tensor]:
        """The tensors holding the weights this optimizer moves: the fp32 partitions under ZeRO, else ``params``."""
        return list(self.zero.fp32_partitioned_groups_flat) if self.zero is not None else list(params)

    @torch.no_grad()
    def restore_weights(self, params: list[torch.Tensor], kept: list[torch.Tensor]) -> None:
        for weight, value in zip(self.weights(params), kept):
            weight.copy_(value)
        if self.zero is not None:
            self._copy_into_model()

    def _copy_into_model(self) -> None:
        """fp32 partitions -> the model's partitions, as DeepSpeed's step does: parameters under
        stage3_param_persistence_threshold stay gathered between steps (a gathered read does not fetch them), so
        they are released and gathered again; without that a read of the LoRA sees the last step's weights."""
        zero = self.zero
        zero._partition_all_parameters()
        for sub_group in range(len(zero.fp16_groups)):
            zero._reassign_or_swap_out_partitioned_parameters(sub_group)
        if zero.persistent_parameters:
            zero.persistent_parameters[0].all_gather(zero.persistent_parameters)
        zero.invalidate_secondary_tensor()
