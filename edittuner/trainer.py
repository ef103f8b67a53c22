"""Phase 2: LoRA training of the DiT alone, from a phase-1 cache.

Data order and noise are functions of (seed, global sample position): sample k of the run always sees the
same cache entry, timestep and noise, whatever the number of processes or where a resume started.
"""

from __future__ import annotations

import json
import math
import signal
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from tqdm import tqdm

from .atomic import write_json
from .cache import CacheReader
from .checkpoint import load_state, resolve_resume, save_state, write_checkpoint
from .errors import EditTunerError
from .images import ResizeConfig
from .lora import PRESETS, inject_lora, load_lora_file, lora_parameters, lora_state_dict, save_lora, set_lora_state
from .models import ModelSource
from .objectives import (DiTDenoiser, FlowMatchConfig, dit_conditioning, fixed_noise_loss, flow_matching_loss,
                         training_scheduler)
from .tracking import MetricsLog


@dataclass
class TrainConfig:
    cache_dir: Path
    output_dir: Path
    model: ModelSource = field(default_factory=ModelSource)
    model_version: str = "2511"
    resize: ResizeConfig = field(default_factory=ResizeConfig)
    max_steps: int = 1000
    learning_rate: float = 1e-4
    warmup_steps: int = 0
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0
    rank: int = 32
    alpha: float | None = None
    gradient_accumulation: int | None = None
    zero_cond_t: bool | None = None
    lora_targets: tuple[str, ...] | None = None
    seed: int = 0
    save_every: int = 500
    keep_last: int | None = None
    gradient_checkpointing: bool = True
    mixed_precision: str = "auto"
    objective: FlowMatchConfig = field(default_factory=FlowMatchConfig)
    resume: str | None = None
    eval_samples: int = 8
    eval_every: int = 0

    def __post_init__(self):
        if self.model_version not in PRESETS:
            raise EditTunerError(f"--model_version {self.model_version}: choose one of {sorted(PRESETS)}")
        preset = PRESETS[self.model_version]
        self.lora_targets = tuple(self.lora_targets or preset.lora_targets)
        self.zero_cond_t = preset.zero_cond_t if self.zero_cond_t is None else self.zero_cond_t
        self.gradient_accumulation = self.gradient_accumulation or preset.gradient_accumulation
        self.alpha = float(self.alpha if self.alpha is not None else self.rank)
        checks = [(self.max_steps >= 1, f"--max_steps {self.max_steps}: must be at least 1"),
                  (self.learning_rate > 0 and math.isfinite(self.learning_rate),
                   f"--learning_rate {self.learning_rate}: must be a positive number"),
                  (self.warmup_steps >= 0, f"--warmup_steps {self.warmup_steps}: must be >= 0"),
                  (1 <= self.rank <= 1024, f"--rank {self.rank}: must be between 1 and 1024"),
                  (self.alpha > 0, f"--alpha {self.alpha}: must be positive"),
                  (self.gradient_accumulation >= 1, f"--gradient_accumulation {self.gradient_accumulation}: must be >= 1"),
                  (self.save_every >= 1, f"--save_every {self.save_every}: must be >= 1"),
                  (self.max_grad_norm >= 0, f"--max_grad_norm {self.max_grad_norm}: must be >= 0 (0 disables clipping)"),
                  (self.mixed_precision in ("auto", "no", "bf16"),
                   f"--mixed_precision {self.mixed_precision}: choose auto, no or bf16"),
                  (self.eval_samples >= 0, f"--eval_samples {self.eval_samples}: must be >= 0"),
                  (self.eval_every >= 0, f"--eval_every {self.eval_every}: must be >= 0 (0: only at start and end)"),
                  (self.keep_last is None or self.keep_last >= 1, f"--keep_last {self.keep_last}: must be >= 1")]
        for ok, message in checks:
            if not ok:
                raise EditTunerError(message)

    def to_json(self) -> dict:
        data = asdict(self)
        return json.loads(json.dumps(data, default=str))


def sample_at(position: int, dataset_size: int, seed: int) -> int:
    """Cache index for global sample position ``position``: a fresh seeded permutation every epoch."""
    epoch, offset = divmod(position, dataset_size)
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    return int(torch.randperm(dataset_size, generator=generator)[offset])


def seed_for_position(seed: int, position: int) -> int:
    return (seed * 2_654_435_761 + position * 40_503 + 1) % (2**63 - 1)


class GracefulStop:
    """SIGTERM/SIGINT finish the current step, write a checkpoint and exit cleanly."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    from accelerate import Accelerator

    cuda = torch.cuda.is_available()
    mixed = ("bf16" if cuda else "no") if cfg.mixed_precision == "auto" else cfg.mixed_precision
    accelerator = Accelerator(mixed_precision=mixed, cpu=not cuda)
    output_dir = Path(cfg.output_dir)
    resume_dir = resolve_resume(cfg.resume, output_dir) if cfg.resume else None

    reader = CacheReader(cfg.cache_dir, expected_resize=cfg.resize, expected_encoders=cfg.model.encoder_fingerprint())
    weight_dtype = torch.bfloat16 if mixed == "bf16" else torch.float32
    dit = cfg.model.load_dit(dtype=weight_dtype, device=accelerator.device)
    torch.manual_seed(cfg.seed)  # LoRA's initial A matrices come from the global RNG
    inject_lora(dit, cfg.lora_targets, cfg.rank, cfg.alpha)
    dit.to(accelerator.device)
    params = [p for _, p in lora_parameters(dit)]
    optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_steps
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    denoiser = DiTDenoiser(dit)
    denoiser, optimizer = accelerator.prepare(denoiser, optimizer)
    scheduler = training_scheduler()

    start_step = 0
    if resume_dir is not None:
        trainer_state = json.loads((resume_dir / "trainer_state.json").read_text())
        set_lora_state(dit, load_lora_file(resume_dir / "lora.safetensors"), cfg.rank, cfg.alpha)
        optimizer.load_state_dict(load_state(resume_dir, "optimizer"))
        # The schedule's lambda is code, not state: load the counters only.
        lr_schedule.load_state_dict({**trainer_state["lr_schedule"], "lr_lambdas": [None] * len(optimizer.param_groups)})
        start_step = trainer_state["step"]

    metadata = {"format": "diffsynth", "base_model": f"Qwen-Image-Edit-{cfg.model_version}",
                "rank": str(cfg.rank), "alpha": str(cfg.alpha), "alpha_folded_into_lora_B": "true",
                "target_modules": list(cfg.lora_targets), "zero_cond_t": str(cfg.zero_cond_t).lower()}

    def save_checkpoint(step: int) -> Path:
        state = lora_state_dict(dit, cfg.rank, cfg.alpha)

        def files(tmp: Path):
            save_lora(tmp / "lora.safetensors", state, metadata)
            save_state(tmp, "optimizer", optimizer.state_dict())
            write_json(tmp / "trainer_state.json", {"step": step, "seed": cfg.seed,
                                                    "lr_schedule": {k: v for k, v in lr_schedule.state_dict().items()
                                                                    if k != "lr_lambdas"}})
        path = None
        if accelerator.is_main_process:
            path = write_checkpoint(output_dir / "checkpoints", step, files, cfg.keep_last)
        accelerator.wait_for_everyone()
        return path

    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
        write_json(output_dir / "config.json", {**cfg.to_json(), "resolved": {
            "mixed_precision": mixed, "processes": accelerator.num_processes, "device": str(accelerator.device),
            "cache_samples": len(reader), "lora_modules": len(params) // 2}})
    metrics = MetricsLog(output_dir / "metrics.jsonl", truncate_after_step=start_step) if accelerator.is_main_process else None

    eval_set = [reader.load(i) for i in range(min(cfg.eval_samples, len(reader)))]

    def evaluate() -> float | None:
        if not eval_set:
            return None
        with accelerator.autocast():
            return fixed_noise_loss(denoiser, scheduler, eval_set, accelerator.device, weight_dtype, cfg.zero_cond_t,
                                    cfg.objective)

    eval_start = evaluate()
    world, rank = accelerator.num_processes, accelerator.process_index
    ga = cfg.gradient_accumulation
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="phase 2", unit="step",
               disable=not (progress and accelerator.is_main_process))
    last_loss = float("nan")
    stopped_early, done = False, start_step
    denoiser.train()
    with GracefulStop() as stop:
        for step in range(start_step, cfg.max_steps):
            step_start = time.perf_counter()
            total = torch.zeros((), device=accelerator.device)
            for micro in range(ga):
                position = (step * ga + micro) * world + rank
                sample = reader.load(sample_at(position, len(reader), cfg.seed))
                torch.manual_seed(seed_for_position(cfg.seed, position))
                x0 = sample["target"][None].to(accelerator.device, weight_dtype)
                conditioning = dit_conditioning(sample, accelerator.device, weight_dtype, cfg.zero_cond_t,
                                                cfg.gradient_checkpointing)
                mask = sample["mask"][None].to(accelerator.device) if "mask" in sample else None
                sync = micro == ga - 1
                with accelerator.no_sync(denoiser) if not sync else nullcontext():
                    with accelerator.autocast():
                        loss = flow_matching_loss(denoiser, scheduler, x0, conditioning, cfg.objective, mask)
                    if not torch.isfinite(loss):
                        raise EditTunerError(f"step {step + 1}: loss is {loss.item()} on sample "
                                             f"{reader.records[sample_at(position, len(reader), cfg.seed)]['id']}; "
                                             "lower --learning_rate or check that sample; the last checkpoint is kept")
                    accelerator.backward(loss / ga)
                total += loss.detach().float()
            grad_norm = None
            if cfg.max_grad_norm > 0:
                grad_norm = float(accelerator.clip_grad_norm_(params, cfg.max_grad_norm))
            optimizer.step()
            lr_schedule.step()
            optimizer.zero_grad(set_to_none=True)
            last_loss = float(accelerator.reduce(total / ga, reduction="mean"))
            step_time = time.perf_counter() - step_start
            record = {"step": step + 1, "loss": last_loss, "lr": lr_schedule.get_last_lr()[0],
                      "grad_norm": grad_norm, "step_time_s": step_time, "samples_per_s": ga * world / step_time}
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                record["eval_loss"] = evaluate()
            if metrics:
                metrics.log(record)
            bar.update()
            bar.set_postfix(loss=f"{last_loss:.4f}")
            done = step + 1
            if done % cfg.save_every == 0 or done == cfg.max_steps or stop.requested:
                save_checkpoint(done)
            if stop.requested and done < cfg.max_steps:
                stopped_early = True
                break
    bar.close()
    if metrics:
        metrics.close()
    if stopped_early:
        if accelerator.is_main_process:
            print(f"stopped at step {done}; checkpoint written. Resume with --resume latest "
                  f"(or --resume {output_dir / 'checkpoints' / f'step-{done}'})")
        return {"steps": done, "loss": last_loss, "lora": None, "stopped": True}
    lora_path = output_dir / "lora.safetensors"
    summary = {"steps": cfg.max_steps, "loss": last_loss, "eval_loss_start": eval_start, "eval_loss_end": evaluate(),
               "lora": str(lora_path), "stopped": False}
    if accelerator.is_main_process:
        save_lora(lora_path, lora_state_dict(dit, cfg.rank, cfg.alpha), metadata)
        write_json(output_dir / "summary.json", summary)
    accelerator.wait_for_everyone()
    return summary
