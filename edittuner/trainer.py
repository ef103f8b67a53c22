"""Phase 2: LoRA training of the DiT alone, from a phase-1 cache.

Data order and noise are functions of (seed, global sample position): sample k of the run always sees the
same cache entry, timestep and noise, whatever the number of processes or where a resume started.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import signal
import sys
import time
import uuid
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable

import torch
from PIL import Image
from tqdm import tqdm

from .atomic import FolderLock, atomic_path, check_output_dir, write_json
from .batching import DataOrder, record_bucket, shape_groups
from .cache import VALIDATION_SUBDIR, CacheReader, open_cache, record_pixels, sha256_file
from .checkpoint import claim_run_dir, load_state, read_trainer_state, resolve_resume, save_state, write_checkpoint
from .configs import DEFAULT_VALIDATION_STEPS, SamplerConfig, TrainConfig
from .distributed import AccelerateRuntime, DeepSpeedRuntime, deepspeed_config_from_env, resolve_deepspeed_config
from .errors import EditTunerError
from .ema import LoraEMA
from .init_lora import inspect_init_lora, load_init_lora
from .lora import (inject_lora, load_lora_file, lora_module_names, lora_parameters, lora_state_dict, save_lora,
                   set_lora_state)
from .metrics import edit_metrics, mean_metrics
from .objectives import OBJECTIVES, Objective
from .performance import attention_backend, check_levers, load_device, place_dit, prepare_base
from .sampling import sample_edit_latents, validation_grid
from .tracking import Tracker


class _ScheduleFreeEval:
    """Context: switch a schedule-free optimizer to its averaged weights, and back to training afterwards.

    ``eval()``/``train()`` move each parameter by a lerp towards the optimizer's z; the round trip is exact in
    real numbers but not in fp32, so a run that saves or evaluates would drift from one that does not. We
    keep the training view and put it back bitwise; ``training_view`` is what a checkpoint stores for resume.

    Under ZeRO-3 the weights are the optimizer's fp32 partitions (``GlobalProdigy.weights``), one per rank: they are
    kept and put back the same way, and a checkpoint stores no ``training_view`` (its optimizer shards, saved in
    the training view, hold them).
    """

    def __init__(self, optimizer, params: list[torch.Tensor]):
        self.optimizer, self.params = optimizer, params
        self.kept: list[torch.Tensor] | None = None

    @property
    def training_view(self) -> list[torch.Tensor] | None:
        return None if self.optimizer is None or self.optimizer.zero is not None else self.kept

    def __enter__(self):
        if self.optimizer is not None:
            self.kept = [w.detach().clone() for w in self.optimizer.weights(self.params)]
            self.optimizer.eval()
        return self

    def __exit__(self, *exc):
        if self.optimizer is not None:
            self.optimizer.train()
            self.optimizer.restore_weights(self.params, self.kept)
        return False


def seed_for_position(seed: int, position: int) -> int:
    return (seed * 2_654_435_761 + position * 40_503 + 1) % (2**63 - 1)


def cfg_dropped(seed: int, position: int, probability: float) -> bool:
    """Whether the sample at global ``position`` trains on the negative prompt (--cfg_dropout): a uniform draw
    that is a function of (seed, position) alone, so resume and N processes draw alike, and apart from the torch
    RNG the noise and timesteps come from, so the other draws (and p = 0) are unchanged."""
    if probability <= 0:
        return False
    digest = hashlib.blake2b(f"cfg_dropout:{seed}:{position}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64 < probability


def with_negative_prompt(sample: dict) -> dict:
    """The sample conditioned on its negative prompt (encoded in phase 1 with the same references) instead."""
    return {**sample, "prompt_emb": sample["negative_prompt_emb"]}


class GracefulStop:
    """SIGTERM/SIGINT finish the current step, write a checkpoint and exit cleanly; a second one stops at once."""

    def __init__(self):
        self.requested = False
        self._previous = {}

    def __enter__(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.requested:  # a second signal: the user does not want to wait for the checkpoint
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


def make_objective(cfg: TrainConfig) -> Objective:
    """The run's objective, picked by name from the registry, with its own settings (cfg.flow or cfg.bridge)."""
    kind = OBJECTIVES[cfg.objective]
    return kind(getattr(cfg, kind.settings_field), cfg.spec)


def validation_sampler(cfg: TrainConfig) -> SamplerConfig:
    """Previews sample as the objective trains: flow with CFG, or the bridge from the first reference."""
    return make_objective(cfg).validation_sampler(cfg.validation_inference_steps, cfg.validation_guidance, cfg.seed)


def peak_rss_gb() -> float:
    import resource
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


class ValidationPreviews:
    """Phase 2's previews: the validation pairs phase 1 encoded (``<cache>/validation``), sampled with fixed seeds
    by the DiT being trained, decoded by the VAE (loaded for this alone) into one grid per step."""

    def __init__(self, cfg: TrainConfig, reader: CacheReader, dit, denoiser, vae, dtype, device, output_dir: Path,
                 every: int):
        self.cfg, self.reader, self.dit, self.denoiser, self.vae = cfg, reader, dit, denoiser, vae
        self.dtype, self.device, self.every = dtype, device, every
        self.samples = [reader.load(i) for i in range(min(cfg.validation_samples, len(reader)))]
        self.sampler = validation_sampler(cfg)
        self.folder = output_dir / "validation"
        self._pixels: dict[int, tuple] = {}

    @classmethod
    def open(cls, cfg: TrainConfig, accelerator, dit, denoiser, dtype, output_dir: Path) -> "ValidationPreviews | None":
        folder = Path(cfg.cache_dir) / VALIDATION_SUBDIR
        every = cfg.validation_steps
        if every is None:
            every = DEFAULT_VALIDATION_STEPS if (folder / "manifest.json").is_file() else 0
        if every == 0:
            return None
        if not (folder / "manifest.json").is_file():
            raise EditTunerError(f"--validation_steps {every}: the cache has no validation pairs ({folder}); run "
                                 "phase 1 with --validation_json <pairs.json>, or pass --validation_steps 0")
        reader = CacheReader(folder, expected_resize=cfg.resize, expected_encoders=cfg.model.encoder_fingerprint(),
                             expected_model_version=cfg.model_version)
        if validation_sampler(cfg).uses_cfg and "negative_prompt_emb" not in reader.load(0):
            raise EditTunerError(f"{folder}: no negative prompt embeddings; re-run phase 1 with --validation_json")
        vae = cfg.model.load_vae(dtype=dtype, device=accelerator.device) if accelerator.is_main_process else None
        return cls(cfg, reader, dit, denoiser, vae, dtype, accelerator.device, output_dir, every)

    def pixels(self, index: int) -> tuple[list, object, object]:
        """References, target and edit mask of pair ``index`` once for the whole run: the pair's own pixels as
        phase 1 sized them (``cache.record_pixels``: a VAE round trip would show the VAE's flaws as if they were
        the data); where its files are gone or changed, the decoded cached latents and the latent-grid mask."""
        if index not in self._pixels:
            record, sample = self.reader.records[index], self.samples[index]
            pixels = record_pixels(record, self.cfg.resize)
            if pixels is not None:
                target, refs, mask = pixels
            else:
                print(f"note: validation pair {record['id']!r}: its source files are gone or changed since phase 1; "
                      "its preview and edit metrics use the VAE's decode of the cached images (and mask)")
                decode = self.cfg.spec.family.decode
                refs = [decode(self.vae, sample[f"ref.{k}"][None]) for k in range(3) if f"ref.{k}" in sample]
                target, mask = decode(self.vae, sample["target"][None]), None
                if "mask" in sample:   # coverage of each 8x8 latent cell, spread over its pixels
                    cells = (sample["mask"][0].float().clamp(0, 1).numpy() * 255).round().astype("uint8")
                    mask = Image.fromarray(cells, mode="L").resize(target.size, Image.Resampling.NEAREST)
            self._pixels[index] = (refs, target, mask)
        return self._pixels[index]

    @torch.no_grad()
    def write(self, step: int, tracker: Tracker | None, evaluate: Callable[[list], dict] | None = None) -> dict:
        """Sample every pair (every process runs the DiT, so sharded models stay in step); the main process
        decodes, scores each output against its target (edit metrics) and writes ``validation/step-N.png`` and
        ``step-N.json``. ``evaluate(samples)``: the fixed-noise loss on the validation pairs (every process).
        Returns the metrics (``val_*``: the means over the pairs) and the time it took, kept apart from step time."""
        start = time.perf_counter()
        rows, scores = [], []
        with torch.random.fork_rng(devices=[]):
            for index, (sample, record) in enumerate(zip(self.samples, self.reader.records)):
                # The version's switches as this run trains (--zero_cond_t may differ from the version's preset).
                latents = sample_edit_latents(self.dit, sample, self.sampler, self.cfg.spec,
                                              self.device, self.dtype, sample.get("negative_prompt_emb"),
                                              denoiser=self.denoiser)
                if self.vae is not None:
                    refs, target, mask = self.pixels(index)
                    output = self.cfg.spec.family.decode(self.vae, latents)
                    scores.append({"id": record["id"], **edit_metrics(output, target, mask)})
                    rows.append((refs, output, target, f"{record['prompt']}   {_score_text(scores[-1])}"))
            result = {f"val_{k}": v for k, v in evaluate(self.samples).items()} if evaluate else {}
        if self.vae is not None:
            path = self.folder / f"step-{step:06d}.png"
            self.folder.mkdir(parents=True, exist_ok=True)
            with atomic_path(path) as tmp:
                validation_grid(rows).save(tmp, format="PNG")
            means = {f"val_{k}": v for k, v in mean_metrics(scores).items() if v is not None}
            write_json(path.with_suffix(".json"), {"step": step, "pairs": scores, **result, **means})
            result.update(means)
            if tracker:
                tracker.log_image("validation", path, step, caption=f"step {step}: references | output | target")
        return {**result, "validation_time_s": time.perf_counter() - start}


def _score_text(score: dict) -> str:
    """A pair's edit metrics for its grid row."""
    parts = [f"PSNR {score['psnr']:.1f} dB", f"SSIM {score['ssim']:.3f}" if score["ssim"] is not None else ""]
    if score["psnr_in_mask"] is not None:
        parts.append(f"in mask {score['psnr_in_mask']:.1f} dB")
    if score["l1_in_mask"] is not None:
        parts.append(f"L1 in/out of mask {score['l1_in_mask']:.1f}/{score['l1_outside_mask'] or 0:.1f}")
    return "(" + ", ".join(p for p in parts if p) + ")"


def check_resume_layout(resume_dir: Path, trainer_state: dict, runtime) -> None:
    """A ZeRO checkpoint holds one optimizer shard per rank; the others hold the whole optimizer."""
    saved_zero, saved_n = trainer_state.get("zero_stage"), trainer_state.get("processes", 1)
    if runtime.zero_stage:
        if not saved_zero or saved_n != runtime.num_processes:
            made = f"under DeepSpeed ZeRO with {saved_n} processes" if saved_zero else "without DeepSpeed ZeRO"
            raise EditTunerError(f"--resume {resume_dir}: this checkpoint was written {made}; resume it the same way "
                                 f"(this run: ZeRO with {runtime.num_processes} processes)")
    elif saved_zero:
        raise EditTunerError(f"--resume {resume_dir}: this checkpoint was written under DeepSpeed ZeRO with {saved_n} "
                             "processes (one optimizer shard each); resume it with the same --deepspeed_config and "
                             "process count")


# What a resume must share with its checkpoint: the LoRA's shape, what the loss is, the optimizer, the numerics
# and the data order. The rest may change on resume; RESUME_CHANGEABLE are the ones the optimizer holds, and
# they take effect from the next step (steps, saving, evaluation, previews and levers are read as the run goes).
# Prodigy's settings are fixed: its param group carries them and loading the checkpoint's optimizer state restores
# the saved ones, so a new value would be silently ignored (and d0 / betas / d_coef define the d being resumed).
RESUME_FIXED = ("model_version", "rank", "alpha", "lora_targets", "zero_cond_t", "objective", "optimizer", "seed",
                "gradient_accumulation", "batch_size", "bucket_batches", "flow", "bridge", "cfg_dropout", "prodigy")
RESUME_CHANGEABLE = ("learning_rate", "warmup_steps", "weight_decay", "max_grad_norm")


def cache_identity_of(reader) -> str:
    """The samples a run trains on (ids and file hashes; with several sources, each one's source and its slots
    per epoch), which its data order is a function of."""
    records = [(r["id"], r.get("file_sha256") or r["file"]) + ((r["source"],) if "source" in r else ())
               for r in reader.records]
    if reader.per_epoch is not None:
        records.append(list(reader.per_epoch))
    return hashlib.sha256(json.dumps(records).encode()).hexdigest()[:16]


def run_settings(cfg: TrainConfig, mixed: str, reader: CacheReader | None) -> dict:
    """What a checkpoint records for resume checks: the fixed settings and the changeable ones."""
    data = cfg.to_json()
    fixed = {**{k: data[k] for k in RESUME_FIXED}, "mixed_precision": mixed}
    if reader is not None:
        fixed["cache"] = cache_identity_of(reader)
    return {"fixed": fixed, "settings": {k: data[k] for k in RESUME_CHANGEABLE}}


def _with_new_defaults(cfg: TrainConfig, name: str, saved):
    """A checkpoint's nested settings (``bridge``, ``flow``) with the settings added since it was written at their
    defaults, which is what it ran with (e.g. ``bridge.sub_stream_target`` = target)."""
    current = getattr(cfg, name, None)
    if not isinstance(saved, dict) or not dataclasses.is_dataclass(current):
        return saved
    try:
        defaults = dataclasses.asdict(type(current)())
    except (TypeError, EditTunerError):   # settings without defaults: compared as saved
        return saved
    return {**json.loads(json.dumps(defaults, default=str)), **saved}


def check_resume_settings(resume_dir: Path, state: dict, cfg: TrainConfig, current: dict) -> list[str]:
    """Refuse a resume that changes what the checkpoint fixed, listing every difference at once; return the
    changes allowed (new lr, warm-up, weight decay, clipping), which apply from the next step."""
    if cfg.max_steps < state["step"]:
        raise EditTunerError(f"--max_steps {cfg.max_steps}: the checkpoint {resume_dir} is already at step "
                             f"{state['step']}; pass --max_steps {state['step']} or more, or resume an earlier "
                             "checkpoint with --resume <run>/checkpoints/step-N")
    saved = state.get("fixed")
    if saved is None:
        print(f"note: {resume_dir} was written before checkpoints recorded their settings; resuming unchecked")
        return []
    diffs = [f"{k}: checkpoint {json.dumps(saved.get(k))}, this run {json.dumps(v)}"
             for k, v in current["fixed"].items() if k in saved and _with_new_defaults(cfg, k, saved[k]) != v]
    if diffs:
        raise EditTunerError(f"--resume {resume_dir}: this run differs from the checkpoint in settings a resume cannot "
                             "change:\n  " + "\n  ".join(diffs) + "\nresume with the checkpoint's values, or start "
                             "a new run (another --output_dir)")
    before = state.get("settings", {})
    return [f"{k} {before.get(k)} -> {v}" for k, v in current["settings"].items() if k in before and before[k] != v]


def apply_setting_changes(lr_schedule, cfg: TrainConfig) -> None:
    """A resumed run's new lr, warm-up and weight decay, from the next step on (the schedule keeps its count)."""
    optimizer = lr_schedule.optimizer
    lr_schedule.base_lrs = [cfg.learning_rate] * len(optimizer.param_groups)
    lrs = [base * fn(lr_schedule.last_epoch) for base, fn in zip(lr_schedule.base_lrs, lr_schedule.lr_lambdas)]
    for group, lr in zip(optimizer.param_groups, lrs):
        group.update(initial_lr=cfg.learning_rate, lr=lr, weight_decay=cfg.weight_decay)
    lr_schedule._last_lr = lrs


def is_main_launch() -> bool:
    """The main process of a launch, known before any runtime starts (torchrun/accelerate set RANK)."""
    return int(os.environ.get("RANK", "0")) == 0


@contextmanager
def run_folder(cfg: TrainConfig, dry_run: bool = False):
    """The main process locks the run folder for the whole run, so a second run into it is refused, and a fresh
    run claims it: a folder holding another run is refused (or replaced with --overwrite)."""
    if not is_main_launch():
        yield
        return
    created = not Path(cfg.output_dir).exists()
    output_dir = check_output_dir(cfg.output_dir, "--output_dir")
    try:
        with FolderLock(output_dir, "training run"):
            resume_dir = resolve_resume(cfg.resume, output_dir) if cfg.resume else None
            own = resume_dir is not None and resume_dir.resolve().parent == (output_dir / "checkpoints").resolve()
            if not own:
                claim_run_dir(output_dir, cfg.overwrite, dry_run)
            if resume_dir is not None:
                check_resume_settings(resume_dir, read_trainer_state(resume_dir), cfg,
                                      run_settings(cfg, resolve_mixed(cfg), None))
            yield
    finally:
        if created and (dry_run or sys.exc_info()[0] is not None):
            FolderLock.remove_empty(output_dir)   # a dry or refused run leaves no folder behind


def resolve_mixed(cfg: TrainConfig) -> str:
    if cfg.mixed_precision == "auto":
        return "bf16" if torch.cuda.is_available() else "no"
    return cfg.mixed_precision


def check_train(cfg: TrainConfig) -> None:
    """`edittuner train --dry_run`: everything a run would refuse before its first step, with nothing loaded and
    nothing written (the launchers run it before phase 1): flags, the output folder and its lock, the resume
    checkpoint and its settings, the model folder, DeepSpeed's config and the levers on this machine."""
    with run_folder(cfg, dry_run=True):
        pass
    if cfg.init_lora is not None and cfg.resume is None:
        inspect_init_lora(cfg)   # the header only: version, rank, recorded targets
    cfg.model.check(("transformer",))
    check_lora_targets(cfg)
    mixed = resolve_mixed(cfg)
    deepspeed_config = deepspeed_settings(cfg, mixed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    check_levers(cfg.performance, device, torch.bfloat16 if mixed == "bf16" else torch.float32,
                 zero_stage=deepspeed_config["zero_optimization"]["stage"] if deepspeed_config else None,
                 batch_size=cfg.batch_size, gradient_checkpointing=cfg.gradient_checkpointing)


def check_lora_targets(cfg: TrainConfig) -> None:
    """A --lora_targets list other than the preset's selects a Linear layer for each name, checked on the DiT's
    modules on the meta device (its config alone), so a typo in LORA_TARGETS fails before phase 1."""
    family = cfg.spec.family
    if cfg.lora_targets != family.presets[cfg.spec.preset.name].lora_targets:
        lora_module_names(family.dit_skeleton(cfg.model), cfg.lora_targets, family)


def deepspeed_settings(cfg: TrainConfig, mixed: str) -> dict | None:
    """The DeepSpeed config this run uses (None: accelerate), after the refusals that depend on it."""
    deepspeed_config = cfg.deepspeed_config or deepspeed_config_from_env()
    if deepspeed_config is None:
        return None
    if cfg.batch_size > 1:
        raise EditTunerError(
            f"--batch_size {cfg.batch_size} under DeepSpeed ZeRO ({deepspeed_config}): the engine counts one backward "
            "per micro-step of batch 1 (train_micro_batch_size_per_gpu 1); use --batch_size 1 with "
            "--gradient_accumulation, or accelerate_configs/ddp.yaml / a single process for --batch_size > 1")
    config = resolve_deepspeed_config(deepspeed_config, cfg.gradient_accumulation, bf16=mixed == "bf16",
                                      max_grad_norm=cfg.max_grad_norm)
    return config   # prodigy_sf too: GlobalProdigy reduces its statistics over the ranks' partitions (one d)


def make_runtime(cfg: TrainConfig, mixed: str):
    """accelerate (single device or DDP), or DeepSpeed ZeRO when a DeepSpeed config is named."""
    config = deepspeed_settings(cfg, mixed)
    if config is None:
        return AccelerateRuntime(mixed, cpu=not torch.cuda.is_available())
    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_DEEPSPEED_CONFIG_FILE"):
        os.environ.pop(var, None)  # so that nothing below builds accelerate's own DeepSpeed plugin
    return DeepSpeedRuntime(config)


def train(cfg: TrainConfig, progress: bool = True) -> dict:
    # The attention kernel around the whole run: under gradient checkpointing the backward runs the blocks again.
    with run_folder(cfg), attention_backend(cfg.performance.attention):
        return _train(cfg, progress)


def build_model(cfg: TrainConfig, device: torch.device, dtype: torch.dtype, zero_stage: int | None = None,
                load_dit: Callable | None = None, on_base: Callable | None = None) -> tuple[torch.nn.Module, list, object]:
    """The DiT as phase 2 trains it, its LoRA parameters and the block offloader (None without that lever): levers
    checked, base loaded where the levers want it, quantized, LoRA from the run's seed, placed on the device.

    ``load_dit(device, dtype)`` replaces loading from ``cfg.model`` (benchmarks/real_scale.py: random weights at
    real size); ``on_base(dit)`` sees the quantized base before the LoRA (its memory, for the benchmark)."""
    levers = cfg.performance
    check_levers(levers, device, dtype, zero_stage=zero_stage, batch_size=cfg.batch_size,
                 gradient_checkpointing=cfg.gradient_checkpointing)
    where = load_device(levers, device)
    dit = load_dit(where, dtype) if load_dit else cfg.model.load_dit(dtype=dtype, device=where)
    blocks = cfg.spec.family.blocks(dit)
    prepare_base(blocks, levers, device)
    if on_base:
        on_base(dit)
    torch.manual_seed(cfg.seed)  # LoRA's initial A matrices come from the global RNG
    inject_lora(dit, cfg.lora_targets, cfg.rank, cfg.alpha, cfg.spec.family)
    offload = place_dit(dit, blocks, levers, device)
    return dit, [p for _, p in lora_parameters(dit)], offload


def check_negative_prompts(cfg: TrainConfig, reader: CacheReader) -> None:
    """--cfg_dropout trains on each sample's negative prompt embedding: refuse a cache phase 1 made without them."""
    if cfg.cfg_dropout > 0 and not reader.has_negative_prompts:
        missing = sum("negative_prompt_emb" not in r.get("shapes", {}) for r in reader.records)
        raise EditTunerError(
            f"--cfg_dropout {cfg.cfg_dropout}: {missing} of the {len(reader)} samples in {cfg.cache_dir} have no "
            "negative prompt embedding; re-run phase 1 with `edittuner precompute --negative_prompts on` and the same "
            "flags (launchers: set CFG_DROPOUT, which turns it on), or pass --cfg_dropout 0")


def start_from_lora(cfg: TrainConfig, dit: torch.nn.Module, main: bool) -> dict | None:
    """--init_lora: the file's weights into the fresh adapters; returns its path and sha256 (the main process
    hashes it) for config.json, the checkpoints and summary.json. --resume wins: the checkpoint holds the weights."""
    if cfg.init_lora is None:
        return None
    if cfg.resume is not None:
        if main:
            print(f"--resume {cfg.resume} wins over --init_lora {cfg.init_lora}: the LoRA and the optimizer come from "
                  "the checkpoint, the init LoRA is not loaded")
        return None
    info = load_init_lora(dit, cfg)
    if main:
        print(f"phase 2 starts from --init_lora {info.path} (rank {info.rank}; the optimizer starts fresh)")
    return {"path": str(info.path.resolve()), "sha256": sha256_file(info.path) if main else None}


def make_optimizer(cfg: TrainConfig, params: list[torch.Tensor]):
    """The optimizer and its lr schedule (linear warm-up, then constant)."""
    if cfg.optimizer == "prodigy_sf":
        from .prodigy import GlobalProdigy
        optimizer = GlobalProdigy(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay,
                                  **cfg.prodigy.optimizer_kwargs())
    else:
        optimizer = torch.optim.AdamW(params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    warmup = cfg.warmup_steps
    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)


class TrainingRun:
    """One phase-2 run's state and the parts that act on it: resume, one optimizer step, evaluation, checkpoints
    and the final LoRA. The runtime (accelerate or DeepSpeed) is only reached through its explicit interface."""

    def __init__(self, cfg: TrainConfig):
        self.cfg, self.mixed = cfg, resolve_mixed(cfg)
        self.runtime = runtime = make_runtime(cfg, self.mixed)
        self.output_dir = Path(cfg.output_dir)
        self.reader = open_cache(cfg.cache_dir, expected_resize=cfg.resize,
                                 expected_encoders=cfg.model.encoder_fingerprint(),
                                 expected_model_version=cfg.model_version)
        buckets = [record_bucket(r) for r in self.reader.records] if cfg.bucket_batches else None
        self.order = DataOrder(self.reader.sizes, self.reader.per_epoch, cfg.seed, cfg.batch_size, buckets)
        self.objective = make_objective(cfg)
        self.objective.check_cache(self.reader)
        check_negative_prompts(cfg, self.reader)
        for note in self.objective.notes() if runtime.is_main_process else ():
            print(f"note: {note}")
        self.dtype = torch.bfloat16 if self.mixed == "bf16" else torch.float32
        self.dit, self.params, self.offload = build_model(cfg, runtime.device, self.dtype, runtime.zero_stage)
        # Before runtime.prepare: DDP starts every rank from these weights, ZeRO-3 partitions them.
        self.init_lora = start_from_lora(cfg, self.dit, runtime.is_main_process)
        optimizer, self.lr_schedule = make_optimizer(cfg, self.params)
        # Schedule-free eval()/train() go to the unwrapped optimizer: accelerate's wrapper has not always forwarded them.
        self.schedule_free = optimizer if cfg.optimizer == "prodigy_sf" else None
        denoiser = cfg.spec.family.denoiser(self.dit)
        # The frozen base is the same on every rank (the same file, or the tiny model from its seed): DDP need not
        # broadcast it at start (40 GB at real size), and cannot broadcast a quantized tensor.
        torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
            denoiser, [n for n, p in denoiser.named_parameters() if not p.requires_grad]
            + [n for n, _ in denoiser.named_buffers()])
        self.denoiser, self.optimizer = runtime.prepare(denoiser, optimizer)
        self.start_step, self.last_loss = 0, float("nan")
        self.settings = run_settings(cfg, self.mixed, self.reader)
        self.run_id = uuid.uuid4().hex[:12]   # keep_last prunes this run's checkpoints only
        self.metadata = {"format": "diffsynth", "base_model": cfg.spec.preset.base_model, "family": cfg.spec.preset.family,
                         "rank": str(cfg.rank), "alpha": str(cfg.alpha), "alpha_folded_into_lora_B": "true",
                         "target_modules": list(cfg.lora_targets), "zero_cond_t": str(cfg.zero_cond_t).lower()}
        self.eval_set = [self.reader.load(i) for i in range(min(cfg.eval_samples, len(self.reader)))]
        self.ema = None
        if cfg.ema_decay:
            with runtime.gathered(self.params):
                self.ema = LoraEMA(lora_parameters(self.dit), cfg.ema_decay, cfg.ema_every,
                                   "cpu" if cfg.ema_on_cpu else runtime.device)
        self.val_start: dict = {}   # the edit metrics before training (the step-0 preview), kept in checkpoints

    def averaged_weights(self) -> _ScheduleFreeEval:
        """Schedule-free optimizers train on an interpolation and keep the average apart: anything that reads the
        weights (evaluation, checkpoints, the final LoRA) must see the average."""
        return _ScheduleFreeEval(self.schedule_free, self.params)

    @contextmanager
    def preview_weights(self):
        """The weights previews sample with: the EMA when on (every rank writes the same average, ZeRO-3 through
        rank 0, and the training weights are put back bitwise), else the averaged weights (schedule-free) or the
        training weights."""
        if self.ema is None:
            with self.averaged_weights():
                yield
            return
        with self.runtime.gathered(self.params, modify=True):
            kept = [p.detach().clone() for p in self.params]
            self.ema.copy_to(self.params)
        try:
            yield
        finally:
            with self.runtime.gathered(self.params, modify=True), torch.no_grad():
                for p, value in zip(self.params, kept):
                    p.data.copy_(value)

    def _resume_ema(self, resume_dir: Path) -> None:
        """The EMA as the checkpoint left it (bitwise), or, from a checkpoint without one, started afresh at the
        resumed weights."""
        if not (resume_dir / "ema.safetensors").is_file():
            with self.runtime.gathered(self.params):
                self.ema.reset(self.params)
            if self.runtime.is_main_process:
                print(f"note: {resume_dir} holds no EMA; --ema_decay {self.cfg.ema_decay} starts from its weights")
            return
        state = load_state(resume_dir, "ema")
        try:
            self.ema.load_state_dict(state)
        except ValueError:
            raise EditTunerError(f"--resume {resume_dir}: its EMA (ema.safetensors) does not fit this run's LoRA; "
                                 "the checkpoint is damaged: resume an earlier one") from None
        if state.get("decay") != self.cfg.ema_decay and self.runtime.is_main_process:
            print(f"resume from {resume_dir}: ema_decay {state.get('decay')} -> {self.cfg.ema_decay} from the next "
                  "update")

    def resume(self, resume_dir: Path) -> None:
        cfg, runtime = self.cfg, self.runtime
        trainer_state = read_trainer_state(resume_dir)
        check_resume_layout(resume_dir, trainer_state, runtime)
        changes = check_resume_settings(resume_dir, trainer_state, cfg, self.settings)
        # The checkpoint holds the averaged weights and the optimizer state saved in eval mode; loading both and
        # switching to train mode rebuilds the training view exactly.
        runtime.load_optimizer(self.optimizer, resume_dir, lambda: set_lora_state(
            self.dit, load_lora_file(resume_dir / "lora.safetensors"), cfg.rank, cfg.alpha))
        if self.schedule_free is not None:
            self.schedule_free.train()
            if (resume_dir / "training_view.safetensors").exists():  # bitwise, not the fp32 lerp round trip
                with torch.no_grad():
                    for p, kept in zip(self.params, load_state(resume_dir, "training_view")):
                        p.copy_(kept)
        if self.ema is not None:
            self._resume_ema(resume_dir)
        self.val_start = trainer_state.get("val_start") or {}
        # The schedule's lambda is code, not state: load the counters only.
        self.lr_schedule.load_state_dict({**trainer_state["lr_schedule"],
                                          "lr_lambdas": [None] * len(self.optimizer.param_groups)})
        if changes:
            apply_setting_changes(self.lr_schedule, cfg)
            if runtime.is_main_process:
                print(f"resume from {resume_dir}: " + ", ".join(changes) + f" from step {trainer_state['step'] + 1}")
        self.start_step, self.run_id = trainer_state["step"], trainer_state.get("run_id", self.run_id)
        self.init_lora = trainer_state.get("init_lora")   # what the resumed run started from, for its summary
        self.last_loss = self.last_loss if trainer_state.get("loss") is None else trainer_state["loss"]

    def save_checkpoint(self, step: int) -> Path | None:
        cfg, runtime = self.cfg, self.runtime
        checkpoints = self.output_dir / "checkpoints"
        staging = checkpoints / f".step-{step}.shards"
        with self.averaged_weights() as view:
            with runtime.gathered(self.params):
                state = lora_state_dict(self.dit, cfg.rank, cfg.alpha)
            if not runtime.zero_stage:   # the whole optimizer, in eval mode beside the averaged LoRA
                write_optimizer = runtime.save_optimizer(self.optimizer, staging)
        if runtime.zero_stage:   # the shards hold the fp32 partitions, i.e. the weights: the training view resumes bitwise
            write_optimizer = runtime.save_optimizer(self.optimizer, staging)
        trainer_state = {"step": step, "seed": cfg.seed, "processes": runtime.num_processes,
                         "zero_stage": runtime.zero_stage, "run_id": self.run_id, "loss": self.last_loss,
                         "init_lora": self.init_lora, **self.settings, "val_start": self.val_start,
                         "lr_schedule": {k: v for k, v in self.lr_schedule.state_dict().items() if k != "lr_lambdas"}}

        def files(tmp: Path):
            save_lora(tmp / "lora.safetensors", state, self.metadata)
            write_optimizer(tmp)
            if view.training_view is not None:
                save_state(tmp, "training_view", view.training_view)
            if self.ema is not None:   # the file for users, and the exact fp32 state for a resume
                save_lora(tmp / "lora_ema.safetensors", self.ema.file_state(cfg.rank, cfg.alpha), self.ema_metadata)
                save_state(tmp, "ema", self.ema.state_dict())
            write_json(tmp / "trainer_state.json", trainer_state)
        path = None
        if runtime.is_main_process:
            try:
                path = write_checkpoint(checkpoints, step, files, cfg.keep_last, self.run_id)
            finally:
                shutil.rmtree(staging, ignore_errors=True)
        runtime.wait_for_everyone()
        return path

    @property
    def ema_metadata(self) -> dict:
        return {**self.metadata, "ema_decay": str(self.cfg.ema_decay), "ema_every": str(self.cfg.ema_every)}

    def evaluate(self) -> dict:
        """The objective's fixed-seed metrics on the eval samples, on the averaged weights, RNG left untouched."""
        if not self.eval_set:
            return {}
        with self.averaged_weights():
            return self.evaluate_on(self.eval_set)

    @torch.no_grad()
    def evaluate_on(self, samples: list[dict]) -> dict:
        """The objective's fixed-seed metrics on ``samples``, on the weights as they are, RNG left untouched."""
        with torch.random.fork_rng(devices=[]):
            return self.objective.evaluate(self.denoiser, samples, self.runtime.device, self.dtype,
                                           self.cfg.gradient_checkpointing, self.runtime.autocast)

    def preview(self, validation: ValidationPreviews, step: int, tracker: Tracker | None) -> dict:
        """One preview with its metrics, on the preview weights; step 0's are the run's baseline (val_start)."""
        with self.preview_weights():
            record = validation.write(step, tracker, self.evaluate_on)
        if step == 0:
            self.val_start = {k: v for k, v in record.items() if k.startswith("val_")}
        return record

    def group_losses(self, step: int, samples: list[dict], positions: list[int], indices: list[int]) -> torch.Tensor:
        """Per-sample losses of same-shape samples in one forward; each draws after its position's seed."""
        with self.runtime.autocast():
            losses = self.objective.losses(self.denoiser, samples, [seed_for_position(self.cfg.seed, p) for p in positions],
                                           self.runtime.device, self.dtype, self.cfg.gradient_checkpointing)
        bad = [i for i, value in enumerate(losses.detach()) if not torch.isfinite(value)]
        if bad:
            raise EditTunerError(f"step {step + 1}: loss is {losses[bad[0]].item()} on sample "
                                 f"{self.reader.records[indices[bad[0]]]['id']}; lower --learning_rate or check that "
                                 "sample; the last checkpoint is kept")
        return losses

    def step(self, step: int, stop_requested: bool) -> tuple[dict, bool]:
        """One optimizer step over accumulation x processes x batch samples; returns its metrics and whether any
        rank asked to stop (the stop flag travels with the loss in one reduce, so every rank stops together)."""
        cfg, runtime = self.cfg, self.runtime
        start = time.perf_counter()
        world, rank, ga, batch = runtime.num_processes, runtime.process_index, cfg.gradient_accumulation, cfg.batch_size
        total, dropped = torch.zeros((), device=runtime.device), 0
        for micro in range(ga):
            # A micro-step takes batch_size consecutive global positions (batch 1: position k is micro-step k's):
            # one bucket's under --bucket_batches, else split into groups of equal latent shapes, each one forward.
            first = ((step * ga + micro) * world + rank) * batch
            positions = list(range(first, first + batch))
            indices = [self.order.index(p) for p in positions]
            samples = [self.reader.load(i) for i in indices]
            for k, position in enumerate(positions):
                if cfg_dropped(cfg.seed, position, cfg.cfg_dropout):
                    samples[k], dropped = with_negative_prompt(samples[k]), dropped + 1
            groups = shape_groups(samples)
            for g, group in enumerate(groups):
                sync = micro == ga - 1 and g == len(groups) - 1
                with runtime.no_sync(self.denoiser) if not sync else nullcontext():
                    losses = self.group_losses(step, [samples[i] for i in group], [positions[i] for i in group],
                                               [indices[i] for i in group])
                    # Each group weighs by its share of the micro-step: the total is the mean over its samples.
                    runtime.backward(losses.mean() * len(group) / batch / ga)
                total += losses.detach().float().sum() / batch
        grad_norm = runtime.clip_grad_norm(self.params, cfg.max_grad_norm)
        lr = self.lr_schedule.get_last_lr()[0]   # the lr this step used
        runtime.optimizer_step(self.optimizer)
        self.lr_schedule.step()
        if self.ema is not None and self.ema.due(step + 1):
            with runtime.gathered(self.params):
                self.ema.update(self.params)
        loss_and_stop = runtime.reduce(torch.stack([total / ga, torch.tensor(float(stop_requested), device=total.device),
                                                    torch.tensor(float(dropped), device=total.device)]), "mean")
        self.last_loss = float(loss_and_stop[0])
        step_time = time.perf_counter() - start
        record = {"step": step + 1, "loss": self.last_loss, "lr": lr, "grad_norm": grad_norm,
                  "step_time_s": step_time, "samples_per_s": ga * world * batch / step_time}
        if cfg.cfg_dropout > 0:   # samples of this step (all processes) that trained on the negative prompt
            record["cfg_dropped"] = round(float(loss_and_stop[2]) * world)
        if self.schedule_free is not None:
            group = self.schedule_free.param_groups[0]
            record["d"], record["d_lr"] = group["d"], group["d"] * group["lr"]
        return record, bool(loss_and_stop[1] > 0)

    def write_config(self) -> None:
        if self.runtime.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            write_json(self.output_dir / "config.json", {**self.cfg.to_json(), "resolved": {
                "mixed_precision": self.mixed, "processes": self.runtime.num_processes,
                "device": str(self.runtime.device), "performance": self.cfg.performance.describe(),
                "cache_samples": len(self.reader), "lora_modules": len(self.params) // 2, "init_lora": self.init_lora}})

    def finish(self, eval_start: dict, last_preview: dict) -> dict:
        """The final evaluation, the LoRA file (averaged weights, gathered), its EMA, summary.json (eval loss and
        the previews' edit metrics at the start and the end) and metrics.png."""
        cfg, runtime = self.cfg, self.runtime
        lora_path = self.output_dir / "lora.safetensors"
        eval_end = self.evaluate()
        val_end = {k: v for k, v in last_preview.items() if k.startswith("val_")}
        summary = {"steps": cfg.max_steps, "loss": self.last_loss, "lora": str(lora_path), "stopped": False,
                   "init_lora": self.init_lora,
                   **{f"{k}_start": v for k, v in {**eval_start, **self.val_start}.items()},
                   **{f"{k}_end": v for k, v in {**eval_end, **val_end}.items()}, **self.objective.summary()}
        with self.averaged_weights(), runtime.gathered(self.params):
            final_state = lora_state_dict(self.dit, cfg.rank, cfg.alpha)
        if self.ema is not None:
            summary["lora_ema"] = str(self.output_dir / "lora_ema.safetensors")
        if runtime.is_main_process:
            save_lora(lora_path, final_state, self.metadata)
            if self.ema is not None:
                save_lora(summary["lora_ema"], self.ema.file_state(cfg.rank, cfg.alpha), self.ema_metadata)
            write_json(self.output_dir / "summary.json", summary)
            write_plot(self.output_dir)
        runtime.wait_for_everyone()
        return summary


def write_plot(output_dir: Path) -> None:
    """metrics.png at the end of a run; a plot that fails costs a warning, never the trained LoRA."""
    from .plots import plot_metrics
    try:
        plot_metrics(output_dir)
    except Exception as exc:   # matplotlib's errors are many types; none should fail a finished run
        print(f"warning: could not write {output_dir / 'metrics.png'} ({exc}); `edittuner plot {output_dir}` "
              "tries again")


def memory_record() -> dict:
    if torch.cuda.is_available():
        return {"peak_memory_gb": torch.cuda.max_memory_allocated() / 2**30}
    return {"peak_memory_gb": peak_rss_gb()}


def _train(cfg: TrainConfig, progress: bool) -> dict:
    run = TrainingRun(cfg)
    runtime, main = run.runtime, run.runtime.is_main_process
    resume_dir = resolve_resume(cfg.resume, run.output_dir) if cfg.resume else None
    if resume_dir is not None:
        run.resume(resume_dir)
    run.write_config()
    tracker = None
    if main:
        tracker = Tracker(run.output_dir, cfg.report_to, {**cfg.to_json(), "processes": runtime.num_processes},
                          start_step=run.start_step, resumed=resume_dir is not None)
    validation = ValidationPreviews.open(cfg, runtime, run.dit, run.denoiser, run.dtype, run.output_dir)
    eval_start = run.evaluate()
    last_preview: dict = {}
    if validation and cfg.validation_at_start and run.start_step == 0:
        last_preview = run.preview(validation, 0, tracker)
    bar = tqdm(total=cfg.max_steps, initial=run.start_step, desc="phase 2", unit="step", disable=not (progress and main))
    stopped_early, done = False, run.start_step
    run.denoiser.train()
    with GracefulStop() as stop:
        for step in range(run.start_step, cfg.max_steps):
            record, stop_now = run.step(step, stop.requested)
            if cfg.eval_every and (step + 1) % cfg.eval_every == 0:
                record.update(run.evaluate())
            if validation and ((step + 1) % validation.every == 0 or step + 1 == cfg.max_steps):
                last_preview = run.preview(validation, step + 1, tracker)
                record.update(last_preview)
            record.update(memory_record())
            if tracker:
                tracker.log(record)
            bar.update()
            bar.set_postfix(loss=f"{run.last_loss:.4f}")
            done = step + 1
            if done % cfg.save_every == 0 or done == cfg.max_steps or stop_now:
                run.save_checkpoint(done)
            if stop_now and done < cfg.max_steps:
                stopped_early = True
                break
    bar.close()
    if tracker:
        tracker.close()
    if stopped_early:
        if main:
            print(f"stopped at step {done}; checkpoint written. Resume with --resume latest "
                  f"(or --resume {run.output_dir / 'checkpoints' / f'step-{done}'})")
        return {"steps": done, "loss": run.last_loss, "lora": None, "stopped": True}
    return run.finish(eval_start, last_preview)
