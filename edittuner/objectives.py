"""Training objectives, for every model family. Flow matching follows the engine's FlowMatchSFTLoss step for step
(tests check parity), on the schedule the family trains with (``Family.training_scheduler``).

Convention (the engine's, for Qwen-Image; a family whose DiT takes another convention maps onto it): sigma in [0, 1] with sigma = timestep / 1000;
x_sigma = (1 - sigma) * x0 + sigma * noise; the DiT predicts the velocity noise - x0; each sample's loss is
weighted by the scheduler's training weight at its timestep.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

from .configs import BRIDGE_T_MAX, BridgeConfig, FlowMatchConfig, SamplerConfig
from .errors import EditTunerError
from .families import Family, ModelSpec, family_of


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None,
                 cfg: FlowMatchConfig) -> torch.Tensor:
    squared = (prediction.float() - target.float()) ** 2
    if mask is None or not cfg.uses_mask:
        return squared.mean()
    weight = cfg.unmasked_weight + (cfg.masked_weight - cfg.unmasked_weight) * mask.float().to(squared.device)
    weight = weight.expand_as(squared)
    return (squared * weight).mean() / weight.mean().clamp_min(1e-8)


def flow_matching_draw(scheduler, x0: torch.Tensor, cfg: FlowMatchConfig = FlowMatchConfig()):
    """One sample's timestep and noise from the global RNG: (timestep (1,), noisy latents, regression target)."""
    steps = len(scheduler.timesteps)
    timestep_id = torch.randint(int(cfg.min_timestep_boundary * steps), int(cfg.max_timestep_boundary * steps), (1,))
    timestep = scheduler.timesteps[timestep_id].to(dtype=x0.dtype, device=x0.device)
    noise = torch.randn_like(x0)
    return timestep, scheduler.add_noise(x0, noise, timestep), scheduler.training_target(x0, noise, timestep)


def flow_matching_losses(denoiser: Callable, scheduler, x0s: list[torch.Tensor],
                         seeds: list[int], conditioning: dict, cfg: FlowMatchConfig = FlowMatchConfig(),
                         masks: list[torch.Tensor | None] | None = None) -> torch.Tensor:
    """Per-sample flow-matching losses (B,) of same-shape samples x0s (each (1, C, h, w)) in one forward.

    Sample i draws its timestep and noise after ``torch.manual_seed(seeds[i])`` in the engine's FlowMatchSFTLoss
    order; a batch of one is the engine's loss exactly, a larger batch equals it up to float reassociation."""
    draws = []
    for x0, seed in zip(x0s, seeds):
        torch.manual_seed(seed)
        draws.append(flow_matching_draw(scheduler, x0, cfg))
    timesteps = torch.cat([d[0] for d in draws])
    prediction = denoiser(latents=torch.cat([d[1] for d in draws]), timestep=timesteps, **conditioning)
    masks = masks or [None] * len(x0s)
    return torch.stack([weighted_mse(prediction[i:i + 1], draw[2], masks[i], cfg) * scheduler.training_weight(draw[0])
                        for i, draw in enumerate(draws)])


# ----------------------------------------------------------------------------------------------------------------
# Latent Bridge Matching (Chadebec et al. 2025, arXiv 2503.07535).
#
# Bridge time t in [0, 1]: t = 0 is the start latent z0 (the first reference, or the white image for the sub
# stream), t = 1 is the target z1. The Brownian bridge with noise level sigma is
#     z_t = (1 - t) z0 + t z1 + sigma * sqrt(t (1 - t)) * eps.
# Mapping onto the engine: its flow-matching sigma is s = 1 - t (s = 1 where the path starts), the DiT's
# timestep input is 1000 * s, and the DiT predicts d z / d s, the engine's "noise - x0" direction. With
# sigma = 0 the bridge *is* the engine's flow matching with the noise replaced by z0, and the target is z0 - z1.
# Regression target (the bridge drift in the engine's sign):
#     u*(z_t, t) = (z_t - z1) / (1 - t) = (z0 - z1) + sigma * sqrt(t / (1 - t)) * eps
# chosen because the sampler needs E[z1 | z_t] = z_t - (1 - t) u, which this target estimates without bias
# (regressing the clean z0 - z1 instead would bias it whenever sigma > 0). Its settings: configs.BridgeConfig.


def bridge_interpolant(z0, z1, t, sigma: float, eps):
    return (1 - t) * z0 + t * z1 + sigma * torch.sqrt(t * (1 - t)) * eps


def bridge_target(z_t, z1, t):
    return (z_t - z1) / (1 - t)


def bridge_step(z_t, prediction, t: float, t_next: float, sigma: float, eps):
    """One step of the bridge from t to t_next: sample the bridge between z_t and the predicted endpoint.

    z1_hat = z_t - (1 - t) * prediction; given z_t and z1_hat, the Brownian bridge at t_next is Gaussian with
    mean z_t + (t_next - t) / (1 - t) * (z1_hat - z_t) and variance sigma^2 (t_next - t)(1 - t_next) / (1 - t).
    At t_next = 1 the variance is 0 and the step lands on z1_hat.
    """
    z1_hat = z_t - (1 - t) * prediction
    mean = z_t + (t_next - t) / (1 - t) * (z1_hat - z_t)
    std = sigma * math.sqrt(max(0.0, (t_next - t) * (1 - t_next) / (1 - t)))
    return mean + std * eps if std > 0 else mean


def bridge_timestep_input(t, dtype, device):
    """The DiT's timestep input for bridge time t (the engine's 1000 * sigma, sigma = 1 - t)."""
    return ((1 - t) * 1000).reshape(1).to(dtype=dtype, device=device)


def sample_bridge_time(cfg: BridgeConfig) -> float:
    if cfg.timestep_sampling == "uniform":
        return float(torch.rand(()) * BRIDGE_T_MAX)
    if cfg.timestep_sampling == "logit_normal":
        return float(torch.sigmoid(torch.randn(()) * cfg.logit_normal_std + cfg.logit_normal_mean).clamp(max=BRIDGE_T_MAX))
    index = torch.multinomial(torch.tensor(cfg.discrete_probabilities, dtype=torch.float), 1)
    return float(cfg.discrete_timesteps[int(index)])


@torch.no_grad()
def sample_bridge(denoiser: Callable, z_start: torch.Tensor, conditioning: dict, steps: int = 1, sigma: float = 0.0,
                  generator: torch.Generator | None = None,
                  keep: tuple[torch.Tensor, torch.Tensor] | None = None) -> torch.Tensor:
    """Integrate the bridge from z_start (t = 0) to t = 1 in ``steps`` equal steps.

    ``keep = (mask, known)``: outside the mask the latents are held on the straight bridge from z_start to
    ``known`` (the source's latents), so they end exactly there."""
    if steps < 1:
        raise EditTunerError(f"--steps {steps}: the bridge needs at least 1 step")
    z = z_start
    grid = [k / steps for k in range(steps + 1)]
    for t, t_next in zip(grid[:-1], grid[1:]):
        timestep = bridge_timestep_input(torch.tensor(t), z.dtype, z.device)
        prediction = denoiser(latents=z, timestep=timestep, **conditioning).to(z.dtype)
        eps = torch.randn(z.shape, generator=generator, dtype=torch.float32).to(z) if t_next < 1 and sigma > 0 else None
        z = bridge_step(z, prediction, t, t_next, sigma, eps)
        if keep is not None:
            mask, known = keep
            z = z * mask + ((1 - t_next) * z_start + t_next * known) * (1 - mask)
    return z


def velocity_scale(z0, z1, t: float, sigma: float) -> torch.Tensor:
    """RMS of the regression target relative to its clean part: sqrt(1 + sigma^2 t / ((1 - t) E[(z0 - z1)^2])).

    Dividing prediction and target by it keeps every timestep's loss on the scale of the clean velocity
    (our variance normalisation, in the spirit of ViBT's stabilised velocity; ViBT's exact factor is not used).
    """
    clean = ((z0 - z1) ** 2).mean().clamp_min(1e-8)
    return torch.sqrt(1 + sigma ** 2 * t / ((1 - t) * clean))


@dataclass(frozen=True)
class BridgeDraw:
    """One sample's random draws for the bridge loss: start, bridge time, point on the bridge and target."""
    z0: torch.Tensor
    t: float
    z_t: torch.Tensor
    target: torch.Tensor
    with_references: bool  # whether the DiT sees the reference tokens for this draw
    z1: torch.Tensor       # the endpoint: the target, or the sub stream's own (ref_gt)
    to_sub_target: bool = False   # the sub stream bridging to its own endpoint, not the target


def bridge_draw(z1: torch.Tensor, z_main: torch.Tensor, z_sub: torch.Tensor | None,
                cfg: BridgeConfig = BridgeConfig(), z_sub_target: torch.Tensor | None = None) -> BridgeDraw:
    """Stream, bridge time and noise from the global RNG, in a fixed order (so a seed gives one draw).
    ``z_sub_target``: where the sub stream goes instead of ``z1`` (ref_gt's latents; ``z_sub`` is then the white
    image at its size); the draws are the same, the noise has the endpoint's shape."""
    use_sub = z_sub is not None and float(torch.rand(())) < cfg.sub_stream_probability
    to_sub_target = use_sub and z_sub_target is not None
    z1 = z_sub_target if to_sub_target else z1
    z0 = z_sub if use_sub else z_main
    if z0.shape != z1.shape:
        raise EditTunerError(f"LBM needs the start latent at the target's size: {tuple(z0.shape)} vs {tuple(z1.shape)}; "
                             "re-run phase 1 with references the size of the targets (--ref_max_pixels = --max_pixels "
                             "and same-size images)")
    t = sample_bridge_time(cfg)
    t_tensor = torch.tensor(t, dtype=torch.float32).to(z1)
    eps = torch.randn_like(z1)
    z_t = bridge_interpolant(z0, z1, t_tensor, cfg.sigma, eps)
    return BridgeDraw(z0, t, z_t, bridge_target(z_t, z1, t_tensor), use_sub or cfg.main_stream_references, z1,
                      to_sub_target)


def _bridge_mse(prediction: torch.Tensor, draw: BridgeDraw, cfg: BridgeConfig,
                mask: torch.Tensor | None) -> torch.Tensor:
    target = draw.target
    if cfg.normalize_velocity:
        scale = velocity_scale(draw.z0.float(), draw.z1.float(), draw.t, cfg.sigma)
        prediction, target = prediction / scale, target / scale
    return weighted_mse(prediction, target, mask, cfg.weighting)


def _forward_groups(draws: list[BridgeDraw]) -> list[list[int]]:
    """Draws that share one forward: the same reference tokens (kept first, as before ref_gt) and latent shape."""
    groups: dict[tuple, list[int]] = {}
    for with_references in (True, False):
        for i, d in enumerate(draws):
            if d.with_references == with_references:
                groups.setdefault((with_references, tuple(d.z_t.shape)), []).append(i)
    return list(groups.values())


def bridge_matching_losses(denoiser: Callable, z1s: list[torch.Tensor], z_mains: list[torch.Tensor],
                           z_subs: list[torch.Tensor | None], seeds: list[int], conditioning: dict,
                           cfg: BridgeConfig = BridgeConfig(),
                           masks: list[torch.Tensor | None] | None = None, family: Family | None = None,
                           z_sub_targets: list[torch.Tensor | None] | None = None,
                           conditioning_at: Callable[[tuple[int, int]], dict] | None = None) -> torch.Tensor:
    """Per-sample LBM losses (B,) of same-shape samples; ``conditioning`` is their collated conditioning by
    ``family`` (default: the default version's), which also splits it into rows and drops the references.

    Sample i draws its stream, bridge time and noise after ``torch.manual_seed(seeds[i])``, so each loss is that
    sample's loss in a batch of one (up to float reassociation). Samples whose draw keeps the reference tokens
    share one forward, those that drop them (main stream with --main_stream_references off) another: the two
    sequences differ in length. ``z_sub_targets[i]`` (ref_gt's latents, or None: the target) is where sample i's
    sub stream goes, from ``z_subs[i]`` of its size; a draw of another latent size than the target runs in a
    forward of its own, with ``conditioning_at(latent_hw)`` (the samples' conditioning for that output size), and
    unmasked: the edit mask covers the target, not ref_gt."""
    draws = []
    z_sub_targets = z_sub_targets or [None] * len(z1s)
    for z1, z_main, z_sub, z_sub_target, seed in zip(z1s, z_mains, z_subs, z_sub_targets, seeds):
        torch.manual_seed(seed)
        draws.append(bridge_draw(z1, z_main, z_sub, cfg, z_sub_target))
    masks = masks or [None] * len(draws)
    losses: list[torch.Tensor | None] = [None] * len(draws)
    family = family or family_of(None)
    for rows in _forward_groups(draws):
        with_references, z_t = draws[rows[0]].with_references, draws[rows[0]].z_t
        if z_t.shape == z1s[rows[0]].shape:
            full = conditioning
        elif conditioning_at is None:
            raise EditTunerError(f"bridge loss: a sub-stream endpoint of latent shape {tuple(z_t.shape)} needs "
                                 "conditioning_at (the conditioning at that size)")
        else:
            full = conditioning_at(tuple(z_t.shape[-2:]))
        part = full if len(rows) == len(draws) else family.select_rows(full, rows)
        if not with_references:
            part = family.without_references(part)
        timesteps = torch.cat([bridge_timestep_input(torch.tensor(draws[i].t), z_t.dtype, z_t.device) for i in rows])
        prediction = denoiser(latents=torch.cat([draws[i].z_t for i in rows]), timestep=timesteps, **part)
        for j, i in enumerate(rows):
            mask = None if draws[i].to_sub_target else masks[i]
            losses[i] = _bridge_mse(prediction[j:j + 1], draws[i], cfg, mask)
    return torch.stack(losses)


# ----------------------------------------------------------------------------------------------------------------
# Objectives as plug-ins: the trainer picks one by name from OBJECTIVES and only calls this interface.

def _placed(samples: list[dict], key: str, device, dtype=None) -> list[torch.Tensor | None]:
    return [s[key][None].to(device, dtype) if key in s else None for s in samples]


class Objective:
    """What a training objective provides: per-sample losses for a batch (batch 1 is a batch of one), its
    evaluation metrics, the sampler its validation previews use, and the checks it needs of a cache."""

    name = ""
    settings_field = ""   # the TrainConfig field holding this objective's settings

    def __init__(self, settings, model: ModelSpec):
        self.settings = settings
        self.model = model   # the version trained, with the run's switches: its family builds the DiT's inputs

    def check_cache(self, reader) -> None:
        """Refuse a cache this objective cannot train on, before any work starts."""

    def notes(self) -> list[str]:
        """What the run should say once at its start about how it uses the cache (after ``check_cache``)."""
        return []

    def summary(self) -> dict:
        """This objective's entries of summary.json beside the metrics (after ``check_cache``)."""
        return {}

    def losses(self, denoiser: Callable, samples: list[dict], seeds: list[int], device, dtype,
               gradient_checkpointing: bool = False) -> torch.Tensor:
        raise NotImplementedError

    def evaluate(self, denoiser: Callable, samples: list[dict], device, dtype, gradient_checkpointing: bool,
                 autocast: Callable) -> dict:
        """Fixed-seed loss over the eval samples, four draws each, one sample at a time (comparable across steps)."""
        losses = []
        for i, sample in enumerate(samples):
            for draw in range(4):
                with autocast():
                    losses.append(float(self.losses(denoiser, [sample], [1234 + i * 4 + draw], device, dtype,
                                                    gradient_checkpointing)[0]))
        return {"eval_loss": sum(losses) / len(losses)}

    def validation_sampler(self, steps: int | None, guidance: float, seed: int):
        raise NotImplementedError


class FlowMatching(Objective):
    """The engine's flow matching (FlowMatchSFTLoss) with mask weighting; previews sample the flow with CFG."""

    name, settings_field = "flow", "flow"

    def __init__(self, settings: FlowMatchConfig, model: ModelSpec):
        super().__init__(settings, model)
        self.scheduler = model.family.training_scheduler()

    def losses(self, denoiser, samples, seeds, device, dtype, gradient_checkpointing=False):
        conditioning = self.model.conditioning(samples, device, dtype, gradient_checkpointing)
        return flow_matching_losses(denoiser, self.scheduler, _placed(samples, "target", device, dtype), seeds,
                                    conditioning, self.settings, _placed(samples, "mask", device))

    def validation_sampler(self, steps, guidance, seed):
        return SamplerConfig(sampler="flow", steps=20 if steps is None else steps, guidance=guidance, seed=seed)


class LatentBridgeMatching(Objective):
    """LBM: the bridge from the first reference (main stream) or the white image (sub stream) to the target;
    evaluation adds how far one bridge step lands from the target; previews run the bridge sampler."""

    name, settings_field = "lbm", "bridge"
    fallback_rows: tuple | list = ()   # --sub_stream_target ref_gt: ids of the rows without one (check_cache)

    @property
    def to_ref_gt(self) -> bool:
        return self.settings.sub_stream_target == "ref_gt"

    def check_cache(self, reader) -> None:
        for record in reader.records:
            shapes = record["shapes"]
            if shapes.get("ref.0") != shapes["target"]:
                raise EditTunerError(
                    f"--objective lbm: sample {record['id']!r} has its first reference at latent shape "
                    f"{shapes.get('ref.0')} but the target at {shapes['target']}; the bridge starts from the reference, "
                    "so both must match. Use same-size source/target pairs and the same pixel budget for both in phase 1 (or "
                    "--reference_size target, which gives every reference the target's size).")
        if self.to_ref_gt:
            self._check_ref_gt(reader)

    def _check_ref_gt(self, reader) -> None:
        if not reader.ref_gt_encoded:
            raise EditTunerError(
                f"--sub_stream_target ref_gt: cache {reader.cache_dir} was made by a phase 1 that did not encode "
                "ref_gt images; re-run `edittuner precompute` with the same flags on this --cache_dir (it keeps every sample "
                "without a ref_gt and encodes the rows that have one), or train with --sub_stream_target target")
        self.fallback_rows = [r["id"] for r in reader.records if "ref_gt" not in r["shapes"]]
        if len(self.fallback_rows) == len(reader.records):
            raise EditTunerError(
                f"--sub_stream_target ref_gt: no sample of cache {reader.cache_dir} has a ref_gt image, so the sub "
                "stream would bridge to the target everywhere; give rows a \"ref_gt\" (the raw folder's ref_gt/, "
                "paired by stem) and re-run phase 1, or train with --sub_stream_target target")

    def notes(self) -> list[str]:
        if not self.to_ref_gt or not self.fallback_rows:
            return []
        shown = ", ".join(repr(i) for i in self.fallback_rows[:5]) + (" ..." if len(self.fallback_rows) > 5 else "")
        return [f"--sub_stream_target ref_gt: {len(self.fallback_rows)} sample(s) have no ref_gt ({shown}); their "
                "sub stream bridges white -> target (counted in summary.json as sub_stream_fallback_rows)"]

    def summary(self) -> dict:
        return {"sub_stream_fallback_rows": len(self.fallback_rows)} if self.to_ref_gt else {}

    def losses(self, denoiser, samples, seeds, device, dtype, gradient_checkpointing=False):
        conditioning = self.model.conditioning(samples, device, dtype, gradient_checkpointing)
        # With ref_gt as the sub stream's endpoint, its start is the white image at ref_gt's size.
        own = [self.to_ref_gt and "ref_gt" in s for s in samples]
        sub_starts = [_placed([s], "ref_gt_white" if o else "white", device, dtype)[0] for s, o in zip(samples, own)]
        sub_targets = _placed(samples, "ref_gt", device, dtype) if self.to_ref_gt else None
        return bridge_matching_losses(
            denoiser, _placed(samples, "target", device, dtype), _placed(samples, "ref.0", device, dtype), sub_starts,
            seeds, conditioning, self.settings, _placed(samples, "mask", device), self.model.family, sub_targets,
            lambda latent_hw: self.model.conditioning(samples, device, dtype, gradient_checkpointing, latent_hw))

    def evaluate(self, denoiser, samples, device, dtype, gradient_checkpointing, autocast):
        result = super().evaluate(denoiser, samples, device, dtype, gradient_checkpointing, autocast)
        ratios = []
        for sample in samples:
            x1 = sample["target"][None].to(device, dtype)
            z0 = sample["ref.0"][None].to(device, dtype)
            if not bool((z0 != x1).any()):   # a pair the edit leaves as it is: no bridge to cross, no ratio
                continue
            conditioning = self.model.conditioning([sample], device, dtype)
            if not self.settings.main_stream_references:
                conditioning = self.model.family.without_references(conditioning)
            with autocast():
                out = sample_bridge(denoiser, z0, conditioning, steps=1)
            ratios.append(float((out - x1).norm() / (z0 - x1).norm()))
        return {**result, **({"bridge_1step_distance_ratio": sum(ratios) / len(ratios)} if ratios else {})}

    def validation_sampler(self, steps, guidance, seed):
        return SamplerConfig(sampler="bridge", steps=1 if steps is None else steps, seed=seed,
                             main_stream_references=self.settings.main_stream_references)


OBJECTIVES: dict[str, type[Objective]] = {"flow": FlowMatching, "lbm": LatentBridgeMatching}
