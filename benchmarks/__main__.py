"""Benchmarks. `python -m benchmarks run [--quick]` writes benchmarks/results/latest.json and rewrites the
generated sections of BENCHMARKS.md (training, sampling, previews here; the app's latency in app_latency.py).
Every figure is a ratio against a baseline timed in the same run.

Model: the tiny text encoder and VAE, with a wider DiT than the tiny one (4 blocks, width 256) so that compute,
not Python bookkeeping, dominates a step, at a 256x256 target with one 256x256 reference.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edittuner.cache import PrecomputeConfig, precompute_cache  # noqa: E402
from edittuner.dataset import GenerateConfig, generate_dataset_json, load_dataset  # noqa: E402
from edittuner.families.qwen_image_edit.encoding import (encode_images_and_prompt, make_encoding_pipe,  # noqa: E402
                                                         reference_prompt_embedder)
from edittuner.images import ResizeConfig, prepare_images  # noqa: E402
from edittuner.families import PRESETS  # noqa: E402
from edittuner.lora import inject_lora, lora_parameters  # noqa: E402
from edittuner.models import ModelSource  # noqa: E402
from edittuner.performance import check_levers  # noqa: E402
from edittuner.families.qwen_image_edit.models import EditDiT  # noqa: E402
from edittuner.families.qwen_image_edit.denoiser import collate_conditioning  # noqa: E402
from edittuner.families.qwen_image_edit.denoiser import DiTDenoiser, training_scheduler  # noqa: E402
from edittuner.families.qwen_image_edit.tiny import TINY_TEXT_DIM, build_tiny_encoders  # noqa: E402
from edittuner.tracking import read_metrics  # noqa: E402
from edittuner.trainer import TrainConfig, train  # noqa: E402

BENCH_DIT = {"num_layers": 4, "attention_head_dim": 64, "num_attention_heads": 4, "joint_attention_dim": TINY_TEXT_DIM,
             "axes_dims_rope": [16, 24, 24]}
SIZE = 256


def write_transformer(folder: Path) -> None:
    from safetensors.torch import save_file
    torch.manual_seed(0)
    dit = EditDiT(**BENCH_DIT)
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(folder / "diffusion_pytorch_model.safetensors"))
    (folder / "config.json").write_text(json.dumps(BENCH_DIT))


def make_bench_dataset(work: Path, count: int) -> Path:
    from edittuner.demo import make_demo_dataset
    make_demo_dataset(work / "demo", size=SIZE)
    rows = json.loads((work / "demo/dataset.json").read_text())
    rows = [dict(r, id=f"{i}", image=str(work / "demo" / r["image"]), back_mask=None,
                 edit_image=[str(work / "demo" / r["edit_image"][0])]) for i, r in enumerate((rows * count)[:count])]
    path = work / "bench.json"
    path.write_text(json.dumps(rows))
    return path


def median_time(fn, repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def timed_run_config(cache: Path, run: Path, model, resize, steps: int, batch: int, **extra):
    """A phase-2 run that only trains (no eval, previews or checkpoints), two warm-up steps more than timed."""
    from edittuner.configs import TrainConfig
    return TrainConfig(cache_dir=cache, output_dir=run, model=model, resize=resize, max_steps=steps + 2, rank=32,
                       gradient_accumulation=1, batch_size=batch, gradient_checkpointing=False, save_every=10_000,
                       eval_samples=0, report_to="none", validation_steps=0, **extra)


def bare_step_times(denoiser, optimizer, preloaded: list, timestep) -> list[float]:
    """Seconds of each bare transformer step (forward, MSE to the flow target, backward, AdamW) on inputs already in
    memory, the first two (warm-up) left out: the baseline a phase-2 step is compared with."""
    times = []
    for x0, noise, conditioning in preloaded:
        start = time.perf_counter()
        prediction = denoiser(latents=(x0 + noise) / 2, timestep=timestep, **conditioning)
        torch.nn.functional.mse_loss(prediction, noise - x0).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    return times[2:]


def bench_phase2(work: Path, dataset: Path, steps: int) -> dict:
    resize = ResizeConfig(max_pixels=SIZE * SIZE)
    model = ModelSource(transformer_dir=str(work / "transformer"))
    cache = work / "cache"
    phase1 = precompute_cache(PrecomputeConfig(dataset_json=dataset, cache_dir=cache, model=model, resize=resize,
                                               overwrite=True), progress=False)
    run = work / "run"
    cfg = TrainConfig(cache_dir=cache, output_dir=run, model=model, resize=resize, max_steps=steps + 2, rank=32,
                      gradient_accumulation=1, gradient_checkpointing=False, save_every=10_000, eval_samples=0)
    train(cfg, progress=False)
    split_step = statistics.median(m["step_time_s"] for m in read_metrics(run / "metrics.jsonl")[2:])

    # Baseline: the same LoRA'd DiT, forward + backward + optimizer step on inputs already in memory.
    dit = model.load_dit()
    torch.manual_seed(0)
    inject_lora(dit, PRESETS["2511"].lora_targets, 32, 32)
    denoiser = DiTDenoiser(dit)
    optimizer = torch.optim.AdamW([p for _, p in lora_parameters(dit)], lr=1e-4)
    # Same inputs as the training run: the same cached samples, in the same order, preloaded into memory.
    from edittuner.cache import CacheReader
    from edittuner.batching import sample_at
    reader = CacheReader(cache)
    order = [sample_at(p, len(reader), cfg.seed) for p in range(steps + 2)]
    preloaded = []
    for index in order:
        sample = reader.load(index)
        x0 = sample["target"][None]
        preloaded.append((x0, torch.randn_like(x0), collate_conditioning([sample], "cpu", torch.float32, True)))
    timestep = training_scheduler().timesteps[500:501]
    bare = statistics.median(bare_step_times(denoiser, optimizer, preloaded, timestep))

    # Online encoding: what a step costs when the text encoder and VAE run inside it (no phase 1).
    encoders = build_tiny_encoders(0)
    pipe = make_encoding_pipe(encoders, "cpu", torch.float32)
    embedder = reference_prompt_embedder(resize.vl_pixels)
    samples = load_dataset(dataset)

    def encode_one():
        target, refs, mask = prepare_images(samples[0], resize)
        encode_images_and_prompt(pipe, embedder, samples[0].prompt, target, refs, mask)

    encode = median_time(encode_one, max(3, steps // 2))
    return {"phase2_step_s": split_step, "bare_forward_backward_s": bare, "overhead_ratio": split_step / bare,
            "online_encode_s": encode, "online_step_s": split_step + encode,
            "online_over_split_ratio": (split_step + encode) / split_step,
            "phase1_samples_per_s": phase1["encoded"] / phase1["seconds"], "phase1_samples": phase1["encoded"]}


# LongCat-Image-Edit's bench transformer: diffusers' LongCatImageTransformer2DModel at the bench DiT's width (256)
# with 2 double-stream and 4 single-stream blocks (the real model's 1:2 ratio), on the tiny LongCat encoders.
LONGCAT_BENCH_DIT = {"patch_size": 1, "in_channels": 64, "num_layers": 2, "num_single_layers": 4,
                     "attention_head_dim": 64, "num_attention_heads": 4, "joint_attention_dim": TINY_TEXT_DIM,
                     "pooled_projection_dim": TINY_TEXT_DIM, "axes_dims_rope": [16, 24, 24]}


def bench_longcat(work: Path, dataset: Path, steps: int, rounds: int = 2) -> dict:
    """LongCat-Image-Edit (--model_version longcat): the phase-2 step of the generic trainer against the bare
    transformer forward + backward + AdamW on the same cached inputs already in memory, and the step with online
    encoding (the pipeline's Qwen2.5-VL prompt with the reference, VAE of target, reference and white) against the
    step from the cache. Runs and bare loops interleaved over ``rounds`` (the machine is shared); medians."""
    from diffusers import LongCatImageTransformer2DModel
    from edittuner.cache import CacheReader
    from edittuner.families import model_spec
    from edittuner.trainer import sample_at
    spec = model_spec("longcat")
    family = spec.family
    resize = ResizeConfig(max_pixels=SIZE * SIZE)
    torch.manual_seed(0)
    LongCatImageTransformer2DModel(**LONGCAT_BENCH_DIT).save_pretrained(work / "longcat-transformer")
    model = ModelSource(family=family.name, transformer_dir=str(work / "longcat-transformer"))
    cache = work / "cache-longcat"
    phase1 = precompute_cache(PrecomputeConfig(dataset_json=dataset, cache_dir=cache, model=model, resize=resize,
                                               model_version=spec.preset.name, overwrite=True), progress=False)
    reader = CacheReader(cache)
    # The bare baseline: the same LoRA'd transformer, the training run's samples in its order, preloaded.
    dit = model.load_dit()
    torch.manual_seed(0)
    inject_lora(dit, spec.preset.lora_targets, 32, 32, family)
    denoiser = family.denoiser(dit)
    optimizer = torch.optim.AdamW([p for _, p in lora_parameters(dit)], lr=1e-4)
    preloaded = []
    for index in (sample_at(p, len(reader), 0) for p in range(steps + 2)):
        sample = reader.load(index)
        x0 = sample["target"][None]
        preloaded.append((x0, torch.randn_like(x0), spec.conditioning([sample], "cpu", torch.float32)))
    timestep = family.training_scheduler().timesteps[500:501]

    def bare_steps() -> list[float]:
        return bare_step_times(denoiser, optimizer, preloaded, timestep)

    encoder = family.sample_encoder(spec.preset, resize.vl_pixels)
    encoder.attach(model.load_encoders(), "cpu", torch.float32)
    first = load_dataset(dataset)[0]

    def encode_one():
        target, refs, mask = encoder.prepare(first, resize)
        encoder.encode(first.prompt, target, refs, mask)

    split, bare, encode = [], [], []
    for round_ in range(rounds):
        run = work / f"run-longcat-{round_}"
        cfg = TrainConfig(cache_dir=cache, output_dir=run, model=model, model_version=spec.preset.name, resize=resize,
                          max_steps=steps + 2, rank=32, gradient_accumulation=1, gradient_checkpointing=False,
                          save_every=10_000, eval_samples=0, report_to="none", validation_steps=0, seed=0)
        train(cfg, progress=False)
        split += [m["step_time_s"] for m in read_metrics(run / "metrics.jsonl")[2:]]
        bare += bare_steps()
        encode.append(median_time(encode_one, max(3, steps // 2), warmup=1))
    split_step, bare_step, encode_s = statistics.median(split), statistics.median(bare), statistics.median(encode)
    return {"rounds": rounds, "dit": LONGCAT_BENCH_DIT, "phase2_step_s": split_step,
            "bare_forward_backward_s": bare_step, "overhead_ratio": split_step / bare_step, "online_encode_s": encode_s,
            "online_step_s": split_step + encode_s, "online_over_split_ratio": (split_step + encode_s) / split_step,
            "phase1_samples_per_s": phase1["encoded"] / phase1["seconds"], "phase1_samples": phase1["encoded"]}


def render_longcat(results: dict) -> str:
    lc, meta = results["longcat"], results["longcat_meta"]
    dit = lc["dit"]
    return "\n".join([
        f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']} (a 2-core VM shared with other jobs)  ",
        f"Date: {meta['date']}  ",
        f"Model: the tiny LongCat text encoder (Qwen2.5-VL) + VAE, LongCatImageTransformer2DModel of "
        f"{dit['num_layers']} double- + {dit['num_single_layers']} single-stream blocks x width "
        f"{dit['attention_head_dim'] * dit['num_attention_heads']} (LoRA rank 32, the longcat preset's targets), "
        f"target {SIZE}x{SIZE} + one {SIZE}x{SIZE} reference, prompt padded to 512 tokens as the pipeline does, fp32; "
        f"training runs and bare loops interleaved over {lc['rounds']} rounds, medians.",
        "", "| figure | value | baseline (same run) | ratio |", "|---|---|---|---|",
        f"| LongCat phase-2 step (cache read, loss, backward, clip, AdamW) | {lc['phase2_step_s'] * 1000:.1f} ms | "
        f"bare transformer fwd+bwd+AdamW on in-memory inputs: {lc['bare_forward_backward_s'] * 1000:.1f} ms | "
        f"{lc['overhead_ratio']:.3f} |",
        f"| LongCat step with online encoding (no phase 1) | {lc['online_step_s'] * 1000:.1f} ms | phase-2 step from "
        f"the cache: {lc['phase2_step_s'] * 1000:.1f} ms | {lc['online_over_split_ratio']:.3f} |",
        f"| LongCat phase 1 (prompt with the reference, target, reference, white) | {lc['phase1_samples_per_s']:.1f} "
        f"samples/s ({lc['phase1_samples']} samples) | | |"])


def bench_dataset_generation(work: Path, count: int) -> dict:
    raw = work / "raw"
    for role in ("target", "source"):
        (raw / role).mkdir(parents=True, exist_ok=True)
    image = Image.new("RGB", (96, 96), (10, 120, 200))
    for i in range(count):
        for role in ("target", "source"):
            image.save(raw / role / f"{i:06d}.png")
    rates = {}
    for verify in (False, True):
        for workers in (1, 2):
            start = time.perf_counter()
            generate_dataset_json(GenerateConfig(raw_dir=raw, output=work / f"ds{workers}{verify}.json", prompt="p",
                                                 workers=workers, verify=verify), progress=False)
            rates[(verify, workers)] = count / (time.perf_counter() - start)
    same = all((work / f"ds1{v}.json").read_bytes() == (work / f"ds2{v}.json").read_bytes() for v in (False, True))
    return {"samples": count, "rate_1_worker": rates[(False, 1)], "rate_2_workers": rates[(False, 2)],
            "speedup_2_over_1": rates[(False, 2)] / rates[(False, 1)],
            "verify_rate_1_worker": rates[(True, 1)], "verify_rate_2_workers": rates[(True, 2)],
            "verify_speedup_2_over_1": rates[(True, 2)] / rates[(True, 1)], "identical_output": same}


def bench_lbm(work: Path, steps: int) -> dict:
    """Bridge sampling (1/2/4 steps) against the engine's 30-step flow sampler, and the LBM step with and without
    reference tokens in the main stream, on the cache and DiT of bench_phase2."""
    from diffsynth.diffusion.flow_match import FlowMatchScheduler
    from edittuner.cache import CacheReader
    from edittuner.objectives import BridgeConfig, sample_bridge
    resize = ResizeConfig(max_pixels=SIZE * SIZE)
    model = ModelSource(transformer_dir=str(work / "transformer"))
    dit = model.load_dit().eval()
    denoiser = DiTDenoiser(dit)
    sample = CacheReader(work / "cache").load(0)
    conditioning = collate_conditioning([sample], "cpu", torch.float32, True)
    z0 = sample["ref.0"][None]

    def flow_30():
        scheduler = FlowMatchScheduler("Qwen-Image")
        scheduler.set_timesteps(30, dynamic_shift_len=z0.shape[-1] * z0.shape[-2] // 4)
        latents = torch.randn_like(z0)
        with torch.no_grad():
            for timestep in scheduler.timesteps:
                prediction = denoiser(latents=latents, timestep=timestep.reshape(1), **conditioning)
                latents = scheduler.step(prediction, timestep, latents)

    repeats = 2 if steps <= 4 else 3
    flow = median_time(flow_30, repeats, warmup=1)
    result = {"flow_30_steps_s": flow}
    for n in (1, 2, 4):
        result[f"bridge_{n}_steps_s"] = median_time(lambda: sample_bridge(denoiser, z0, conditioning, steps=n), repeats * 3, warmup=1)
        result[f"flow30_over_bridge{n}"] = flow / result[f"bridge_{n}_steps_s"]
    times = {}
    for refs in (True, False):
        run = work / f"lbm-{refs}"
        cfg = TrainConfig(cache_dir=work / "cache", output_dir=run, model=model, resize=resize, max_steps=steps + 2,
                          rank=32, gradient_accumulation=1, gradient_checkpointing=False, save_every=10_000,
                          eval_samples=0, objective="lbm",
                          bridge=BridgeConfig(sub_stream_probability=0.0, main_stream_references=refs))
        train(cfg, progress=False)
        times[refs] = statistics.median(m["step_time_s"] for m in read_metrics(run / "metrics.jsonl")[2:])
    result.update({"lbm_step_with_refs_s": times[True], "lbm_step_without_refs_s": times[False],
                   "with_over_without_refs": times[True] / times[False]})
    return result


def bench_sampling(work: Path, repeats: int) -> dict:
    """Time per edited image on the built-in tiny model (encode prompt + reference, sample, decode), 256x256:
    flow matching with 30 steps and true CFG against 1/2/4-step bridge sampling."""
    from edittuner.images import load_rgb
    from edittuner.sampling import Editor, SamplerConfig
    editor = Editor(resize=ResizeConfig(max_pixels=SIZE * SIZE))
    source = load_rgb(work / "demo/raw/source/00_astronaut.png")
    prompt = "Make the marked region black and white."
    result = {"flow_30_cfg_s": median_time(lambda: editor.edit([source], prompt, SamplerConfig(sampler="flow", steps=30)),
                                           repeats, warmup=3)}
    for n in (1, 2, 4):
        sampler = SamplerConfig(sampler="bridge", steps=n)
        result[f"bridge_{n}_s"] = median_time(lambda: editor.edit([source], prompt, sampler), repeats * 3, warmup=3)
        result[f"flow_over_bridge{n}"] = result["flow_30_cfg_s"] / result[f"bridge_{n}_s"]
    return result


def bench_previews(work: Path, dataset: Path, steps: int) -> dict:
    """What validation previews add to a training step at their default interval: one preview of 4 pairs (flow,
    20 steps, CFG, decode, grid) timed inside a run of the bench DiT, spread over DEFAULT_VALIDATION_STEPS steps."""
    from edittuner.trainer import DEFAULT_VALIDATION_STEPS
    resize = ResizeConfig(max_pixels=SIZE * SIZE)
    model = ModelSource(transformer_dir=str(work / "transformer"))
    pairs = work / "validation.json"
    pairs.write_text(json.dumps(json.loads(dataset.read_text())[:4]))
    cache = work / "cache-val"
    precompute_cache(PrecomputeConfig(dataset_json=dataset, cache_dir=cache, model=model, resize=resize,
                                      validation_json=pairs), progress=False)
    run = work / "run-previews"
    cfg = TrainConfig(cache_dir=cache, output_dir=run, model=model, resize=resize, max_steps=steps + 2, rank=32,
                      gradient_accumulation=1, gradient_checkpointing=False, save_every=10_000, eval_samples=0,
                      validation_steps=steps + 2, report_to="none")
    train(cfg, progress=False)
    metrics = read_metrics(run / "metrics.jsonl")
    step = statistics.median(m["step_time_s"] for m in metrics[2:])
    preview = metrics[-1]["validation_time_s"]
    return {"step_s": step, "preview_s": preview, "interval": DEFAULT_VALIDATION_STEPS,
            "extra_per_step_s": preview / DEFAULT_VALIDATION_STEPS,
            "step_with_previews_over_step": (step + preview / DEFAULT_VALIDATION_STEPS) / step}


# ---- processes, checkpoints and resume -------------------------------------------------------------------------
# Each of these runs `edittuner` (or a small driver) as subprocesses, the way a user does, on the bench DiT and cache.

PHASE1_DRIVER = """
import json, sys, torch
from pathlib import Path
from accelerate import PartialState
# Phase 2's Accelerator passes cpu=True on a CPU-only machine; phase 1's PartialState() does not (so the plain
# CLI does not shard on CPU), so the driver starts the CPU process group itself, as that fix would.
state = PartialState(cpu=not torch.cuda.is_available())
from edittuner.cache import PrecomputeConfig, precompute_cache
from edittuner.images import ResizeConfig
from edittuner.models import ModelSource
dataset, cache, pixels, out = sys.argv[1:5]
result = precompute_cache(PrecomputeConfig(dataset_json=Path(dataset), cache_dir=Path(cache), model=ModelSource(),
                                           resize=ResizeConfig(max_pixels=int(pixels)), overwrite=True), progress=False)
Path(out, f"rank{state.process_index}.json").write_text(json.dumps({"encoded": result["encoded"],
                                                                    "seconds": result["seconds"]}))
"""


def _free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch_command(processes: int, script: list[str]) -> list[str]:
    if processes == 1:
        return [sys.executable, *script]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "accelerate_configs/ddp.yaml"),
            "--num_processes", str(processes), "--main_process_port", str(_free_port()), *script]


def _env(processes: int) -> dict:
    """One thread per process, for 1 and 2 processes alike: the ratio is then process scaling alone (with 2 OpenMP
    threads, a single process on this 2-core machine slowed down erratically whenever anything else ran)."""
    threads = 1
    return {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
            "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "", "WANDB_API_KEY": ""}


def _run_timed(command: list[str], env: dict) -> float:
    start = time.perf_counter()
    result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-3000:]}")
    return time.perf_counter() - start


def bench_phase1_processes(work: Path, dataset: Path) -> dict:
    """Phase-1 samples/s with 1 and 2 processes on the same dataset (encoding time; encoder load excluded)."""
    driver = work / "phase1_driver.py"
    driver.write_text(PHASE1_DRIVER)
    result = {"samples": len(json.loads(dataset.read_text()))}
    for processes in (1, 2):
        out = work / f"phase1-{processes}"
        out.mkdir(exist_ok=True)
        wall = _run_timed(_launch_command(processes, [str(driver), str(dataset), str(work / f"cache-p{processes}"),
                                                      str(SIZE * SIZE), str(out)]), _env(processes))
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(processes)]
        encoded = sum(r["encoded"] for r in ranks)
        assert encoded == result["samples"], ranks
        result[f"samples_per_s_{processes}"] = encoded / max(r["seconds"] for r in ranks)
        result[f"wall_s_{processes}"] = wall
    result["speedup_2_over_1"] = result["samples_per_s_2"] / result["samples_per_s_1"]
    result["wall_ratio_2_over_1"] = result["wall_s_2"] / result["wall_s_1"]
    return result


def _ensure_cache(work: Path, dataset: Path) -> Path:
    """The bench cache (made in this process unless an earlier case made it)."""
    cache = work / "cache"
    if not (cache / "manifest.json").is_file():
        precompute_cache(PrecomputeConfig(dataset_json=dataset, cache_dir=cache, resize=ResizeConfig(max_pixels=SIZE * SIZE),
                                          model=ModelSource(transformer_dir=str(work / "transformer")), overwrite=True),
                         progress=False)
    return cache


def _train_command(cache: Path, run: Path, steps: int, accumulation: int, *extra) -> list[str]:
    return ["-m", "edittuner", "train", "--cache_dir", str(cache), "--output_dir", str(run), "--max_pixels", str(SIZE * SIZE),
            "--model_dir", "tiny", "--transformer_dir", str(cache.parent / "transformer"), "--max_steps", str(steps),
            "--rank", "32", "--gradient_accumulation", str(accumulation), "--gradient_checkpointing", "off",
            "--eval_samples", "0", "--report_to", "none", "--validation_steps", "0", "--save_every", "10000", *extra]


def bench_phase2_processes(work: Path, dataset: Path, steps: int) -> dict:
    """Phase-2 samples/s: 1 process x accumulation 2 against 2 DDP processes x accumulation 1 (the same samples
    per optimizer step), median over the steps after the first two."""
    cache = _ensure_cache(work, dataset)
    result = {}
    for processes in (1, 2):
        run = work / f"ddp-{processes}"
        shutil.rmtree(run, ignore_errors=True)
        wall = _run_timed(_launch_command(processes, _train_command(cache, run, steps + 2, 2 // processes)),
                          _env(processes))
        metrics = read_metrics(run / "metrics.jsonl")[2:]
        result[f"samples_per_s_{processes}"] = statistics.median(m["samples_per_s"] for m in metrics)
        result[f"step_s_{processes}"] = statistics.median(m["step_time_s"] for m in metrics)
        result[f"wall_s_{processes}"] = wall
    result["speedup_2_over_1"] = result["samples_per_s_2"] / result["samples_per_s_1"]
    return result


ZERO_PRODIGY_RUNS = {"zero3_prodigy": ("prodigy_sf", True), "zero3_adamw": ("adamw", True),
                     "ddp_prodigy": ("prodigy_sf", False)}


def bench_zero_prodigy(work: Path, dataset: Path, steps: int, rounds: int = 2) -> dict:
    """Phase-2 step time of ZeRO-3 + Prodigy (edittuner/prodigy.py's reductions) against ZeRO-3 + AdamW and
    against DDP + Prodigy: 2 CPU processes under torchrun, accumulation 1, the three runs interleaved in each
    round; median over the steps after the first two, then over rounds."""
    cache = _ensure_cache(work, dataset)
    times: dict[str, list[float]] = {name: [] for name in ZERO_PRODIGY_RUNS}
    for _ in range(rounds):
        for name, (optimizer, zero) in ZERO_PRODIGY_RUNS.items():
            run = work / f"zp-{name}"
            shutil.rmtree(run, ignore_errors=True)
            extra = ["--optimizer", optimizer] + (["--deepspeed_config", str(ROOT / "accelerate_configs/zero3.json")]
                                                  if zero else [])
            launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr",
                      "127.0.0.1", "--master_port", str(_free_port())]
            _run_timed(launch + _train_command(cache, run, steps + 2, 1, *extra), _env(2))
            times[name].append(statistics.median(m["step_time_s"] for m in read_metrics(run / "metrics.jsonl")[2:]))
    result = {f"{name}_step_s": statistics.median(t) for name, t in times.items()}
    result["rounds"] = rounds
    result["zero3_prodigy_over_zero3_adamw"] = result["zero3_prodigy_step_s"] / result["zero3_adamw_step_s"]
    result["zero3_prodigy_over_ddp_prodigy"] = result["zero3_prodigy_step_s"] / result["ddp_prodigy_step_s"]
    return result


def render_zero_prodigy(results: dict) -> str:
    r, meta = results["zero_prodigy"], results["zero_prodigy_meta"]
    return "\n".join([
        f"`{meta['command']}` on {meta['machine']}, {meta['date']} (shared CPU: ratios of runs interleaved in each "
        f"of {r['rounds']} rounds; bench DiT, rank 32, 256x256, accumulation 1, 2 processes under torchrun).",
        "",
        "| run | step (s) | ratio |",
        "|---|---|---|",
        f"| ZeRO-3 + AdamW | {r['zero3_adamw_step_s']:.2f} | 1.00 (baseline) |",
        f"| ZeRO-3 + Prodigy | {r['zero3_prodigy_step_s']:.2f} | {r['zero3_prodigy_over_zero3_adamw']:.2f} |",
        f"| DDP + Prodigy | {r['ddp_prodigy_step_s']:.2f} | "
        f"{r['ddp_prodigy_step_s'] / r['zero3_adamw_step_s']:.2f} |",
        "",
        f"ZeRO-3 + Prodigy over DDP + Prodigy: **{r['zero3_prodigy_over_ddp_prodigy']:.2f}**."])


def bench_batching(work: Path, steps: int, rounds: int = 2) -> dict:
    """Phase-2 samples/s at --batch_size 1, 2, 4 (accumulation 1, same bench DiT, in this process) on a cache of
    same-shape samples (the demo's square pairs: every micro-step is one batched forward), median step time over
    the steps after the first two of each run (runs interleaved over rounds), as ratios against batch 1."""
    from edittuner.demo import make_demo_dataset
    make_demo_dataset(work / "demo", size=SIZE)
    rows = [r for r in json.loads((work / "demo/dataset.json").read_text())
            if r["width"] == r["height"] and len(r["edit_image"]) == 1]
    rows = [dict(r, id=f"{i}", image=str(work / "demo" / r["image"]), back_mask=None,
                 edit_image=[str(work / "demo" / r["edit_image"][0])]) for i, r in enumerate((rows * 16)[:16])]
    (work / "bench_square.json").write_text(json.dumps(rows))
    resize = ResizeConfig(max_pixels=SIZE * SIZE)
    model = ModelSource(transformer_dir=str(work / "transformer"))
    cache = work / "cache_square"
    precompute_cache(PrecomputeConfig(dataset_json=work / "bench_square.json", cache_dir=cache, model=model,
                                      resize=resize, overwrite=True), progress=False)
    shapes = {json.dumps(r["shapes"]["target"]) for r in json.loads((cache / "manifest.json").read_text())["samples"]}
    result = {"samples": len(rows), "target_shapes": sorted(shapes), "rounds": rounds}
    step_times = {(objective, batch): [] for objective in ("flow", "lbm") for batch in (1, 2, 4)}
    for round_ in range(rounds):  # interleaved, so that load on a shared machine hits every batch size alike
        for objective, batch in step_times:
            run = work / f"batch-{objective}-{batch}-{round_}"
            train(timed_run_config(cache, run, model, resize, steps, batch, objective=objective), progress=False)
            step_times[objective, batch] += [m["step_time_s"] for m in read_metrics(run / "metrics.jsonl")[2:]]
    for (objective, batch), times in step_times.items():
        prefix = "" if objective == "flow" else "lbm_"
        result[f"{prefix}step_s_{batch}"] = statistics.median(times)
        result[f"{prefix}samples_per_s_{batch}"] = batch / result[f"{prefix}step_s_{batch}"]
    for prefix in ("", "lbm_"):
        for batch in (2, 4):
            result[f"{prefix}speedup_{batch}_over_1"] = (result[f"{prefix}samples_per_s_{batch}"]
                                                         / result[f"{prefix}samples_per_s_1"])
    return result


def render_batching(results: dict) -> str:
    b, meta = results["batching"], results["batching_meta"]
    lines = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ", f"Date: {meta['date']}  ",
             f"Model: the bench DiT (4 blocks x width 256, LoRA rank 32, 2511 targets), target {SIZE}x{SIZE} + one "
             f"{SIZE}x{SIZE} reference, fp32, accumulation 1, {b['samples']} same-shape cached samples; median step "
             f"time over {b['rounds']} interleaved rounds of runs.",
             "", "| figure | value | baseline (same run) | ratio |", "|---|---|---|---|"]
    for prefix, label in (("", ""), ("lbm_", "`--objective lbm`, ")):
        if f"{prefix}samples_per_s_1" not in b:
            continue
        for batch in (2, 4):
            lines.append(f"| phase 2, {label}`--batch_size {batch}` | {b[f'{prefix}samples_per_s_{batch}']:.2f} samples/s "
                         f"({b[f'{prefix}step_s_{batch}'] * 1000:.0f} ms/step) | `--batch_size 1`: "
                         f"{b[f'{prefix}samples_per_s_1']:.2f} samples/s ({b[f'{prefix}step_s_1'] * 1000:.0f} ms/step) | "
                         f"{b[f'{prefix}speedup_{batch}_over_1']:.2f} |")
    return "\n".join(lines)


def _mixed_aspect_cache(work: Path, count: int = 16) -> tuple[Path, ResizeConfig, ModelSource]:
    """The demo's one-reference pairs at SIZE, square and landscape, encoded with --buckets on: two buckets."""
    from edittuner.demo import make_demo_dataset
    make_demo_dataset(work / "demo", size=SIZE)
    rows = [r for r in json.loads((work / "demo/dataset.json").read_text()) if len(r["edit_image"]) == 1]
    rows = [dict(r, id=f"{i}", image=str(work / "demo" / r["image"]), back_mask=None,
                 edit_image=[str(work / "demo" / r["edit_image"][0])]) for i, r in enumerate((rows * count)[:count])]
    (work / "bench_mixed.json").write_text(json.dumps(rows))
    resize = ResizeConfig(max_pixels=SIZE * SIZE, buckets=True)
    model = ModelSource(transformer_dir=str(work / "transformer"))
    cache = work / "cache_mixed"
    precompute_cache(PrecomputeConfig(dataset_json=work / "bench_mixed.json", cache_dir=cache, model=model,
                                      resize=resize, overwrite=True), progress=False)
    return cache, resize, model


def bench_buckets(work: Path, steps: int, rounds: int = 2) -> dict:
    """Phase-2 samples/s at --batch_size 1, 2, 4 on a mixed-aspect cache (two buckets), micro-batches from one bucket
    (--bucket_batches on) against today's grouping (off: consecutive samples split into same-shape groups, each its
    own forward); samples over time of the steps after the first two, runs interleaved over rounds, as ratios
    against batch 1 of the same run."""
    from edittuner.batching import DataOrder, record_bucket, shape_groups
    from edittuner.cache import CacheReader
    cache, resize, model = _mixed_aspect_cache(work)
    records = CacheReader(cache).records
    buckets = [record_bucket(r) for r in records]
    result = {"samples": len(records), "buckets": sorted(set(buckets)), "rounds": rounds}
    totals = {(batch, on): [0.0, 0] for batch in (1, 2, 4) for on in ((True, False) if batch > 1 else (True,))}
    for round_ in range(rounds):  # interleaved, so that load on a shared machine hits every case alike
        for batch, on in totals:
            run = work / f"buckets-{batch}-{on}-{round_}"
            train(timed_run_config(cache, run, model, resize, steps, batch, bucket_batches=on), progress=False)
            for m in read_metrics(run / "metrics.jsonl")[2:]:
                totals[batch, on][0] += m["step_time_s"]
                totals[batch, on][1] += batch
    for (batch, on), (seconds, samples) in totals.items():
        name = f"{batch}_{'buckets' if on else 'grouping'}" if batch > 1 else "1"
        result[f"samples_per_s_{name}"] = samples / seconds
        # forwards per micro-step over the positions these runs trained on (one per same-shape group)
        order = DataOrder([len(records)], None, 0, batch, buckets if on else None)
        groups = [len(shape_groups([{"target": torch.zeros(json.loads(buckets[order.index(p)])[0])}
                                    for p in range(first, first + batch)]))
                  for first in range(0, (steps + 2) * batch, batch)]
        result[f"forwards_per_step_{name}"] = sum(groups) / len(groups)
    for batch in (2, 4):
        for kind in ("buckets", "grouping"):
            result[f"speedup_{batch}_{kind}_over_1"] = result[f"samples_per_s_{batch}_{kind}"] / result["samples_per_s_1"]
        result[f"buckets_over_grouping_{batch}"] = (result[f"samples_per_s_{batch}_buckets"]
                                                    / result[f"samples_per_s_{batch}_grouping"])
    return result


def render_buckets(results: dict) -> str:
    b, meta = results["buckets"], results["buckets_meta"]
    lines = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']} (shared with other jobs: compare the "
             "ratios, measured in one run, not the absolute figures)  ", f"Date: {meta['date']}  ",
             f"Model: the bench DiT (4 blocks x width 256, LoRA rank 32, 2511 targets), fp32, accumulation 1; "
             f"{b['samples']} cached samples in {len(b['buckets'])} aspect buckets (`--buckets on`, max_pixels "
             f"{SIZE}x{SIZE}: square and landscape, one same-size reference); samples over time of the steps after "
             f"the first two, {b['rounds']} interleaved rounds of runs.",
             "", "| figure | samples/s | forwards per micro-step | ratio to `--batch_size 1` |", "|---|---|---|---|",
             f"| `--batch_size 1` (baseline) | {b['samples_per_s_1']:.2f} | {b['forwards_per_step_1']:.2f} | 1.00 |"]
    for batch in (2, 4):
        for kind, label in (("grouping", "`--bucket_batches off` (same-shape groups by chance)"),
                            ("buckets", "`--bucket_batches on` (one bucket per micro-batch)")):
            lines.append(f"| `--batch_size {batch}`, {label} | {b[f'samples_per_s_{batch}_{kind}']:.2f} | "
                         f"{b[f'forwards_per_step_{batch}_{kind}']:.2f} | {b[f'speedup_{batch}_{kind}_over_1']:.2f} |")
    lines.append("")
    lines.append("Buckets over today's grouping, same batch size: " + ", ".join(
        f"batch {batch}: {b[f'buckets_over_grouping_{batch}']:.2f}x" for batch in (2, 4)) + ".")
    return "\n".join(lines)


LEVERS = {"attention sdpa": {"attention": "sdpa"}, "attention flash": {"attention": "flash"},
          "attention math": {"attention": "math"}, "compile": {"compile": True}, "int8 base": {"base_quantization": "int8"},
          "fp8 base": {"base_quantization": "fp8"}, "block offload": {"offload_blocks": True},
          "attention efficient": {"attention": "efficient"}, "attention cudnn": {"attention": "cudnn"}}
LEVER_WARMUP = 4  # steps left out of the median: compiling (and recompiling for a second shape) happens here


def bench_levers(work: Path, dataset: Path, steps: int, rounds: int = 2) -> dict:
    """Each speed/memory lever on and off: phase-2 step time (median over the steps after the first
    LEVER_WARMUP, runs interleaved over rounds), the DiT's weight bytes, and for a quantized base the loss on the
    same steps against the plain run. Gradient checkpointing on, as the trainer's default. A lever that cannot
    run here is recorded with the message the trainer gives."""
    from edittuner.performance import PerformanceConfig, prepare_base, quantized_bytes
    cache = _ensure_cache(work, dataset)
    resize = ResizeConfig(max_pixels=SIZE * SIZE)
    model = ModelSource(transformer_dir=str(work / "transformer"))
    cases = {"baseline": {}, **LEVERS}
    result = {"rounds": rounds, "steps": steps, "warmup": LEVER_WARMUP, "cases": {}}
    runnable = {}
    for name, levers in cases.items():
        try:
            check_levers(PerformanceConfig(**levers), torch.device("cpu"), torch.float32)
            runnable[name] = levers
        except Exception as exc:  # EditTunerError: the refusal is the figure
            result["cases"][name] = {"refused": str(exc)}
    times = {name: [] for name in runnable}
    losses, compile_s = {}, []
    # An empty compile cache, so the first compiled run pays what a user's first run pays; later runs hit
    # inductor's on-disk cache, as a user's later runs do.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(work / "inductor-cache")
    for round_ in range(rounds):
        for name, levers in runnable.items():
            run = work / f"lever-{name.replace(' ', '-')}-{round_}"
            if levers.get("compile"):
                torch._dynamo.reset()
            cfg = TrainConfig(cache_dir=cache, output_dir=run, model=model, resize=resize,
                              max_steps=steps + LEVER_WARMUP, rank=32, gradient_accumulation=1, save_every=10_000,
                              eval_samples=0, report_to="none", validation_steps=0,
                              performance=PerformanceConfig(**levers))
            train(cfg, progress=False)
            metrics = read_metrics(run / "metrics.jsonl")
            times[name] += [m["step_time_s"] for m in metrics[LEVER_WARMUP:]]
            losses.setdefault(name, [m["loss"] for m in metrics])
            if levers.get("compile"):
                compile_s.append(sum(m["step_time_s"] for m in metrics[:LEVER_WARMUP]))
    base_s = statistics.median(times["baseline"])
    for name, step_times in times.items():
        median = statistics.median(step_times)
        entry = {"step_s": median, "speedup": base_s / median}
        if name != "baseline":
            rel = [abs(a - b) / abs(b) for a, b in zip(losses[name], losses["baseline"])]
            entry["max_rel_loss_diff"] = max(rel)
        result["cases"][name] = entry
    if compile_s:
        overhead = [first - LEVER_WARMUP * result["cases"]["compile"]["step_s"] for first in compile_s]
        result["cases"]["compile"]["compile_overhead_cold_s"] = overhead[0]
        if len(overhead) > 1:
            result["cases"]["compile"]["compile_overhead_warm_s"] = statistics.median(overhead[1:])
    for name, levers in (("baseline", {}), ("int8 base", {"base_quantization": "int8"})):
        if name in runnable:
            dit = model.load_dit()
            prepare_base(model.model_family.blocks(dit), PerformanceConfig(**levers), torch.device("cpu"))
            result["cases"][name]["block_weight_bytes"] = quantized_bytes(dit.transformer_blocks)
            result["cases"][name]["dit_weight_bytes"] = quantized_bytes(dit)
    return result


def render_levers(results: dict) -> str:
    lv, meta = results["levers"], results["levers_meta"]
    cases, base = lv["cases"], lv["cases"]["baseline"]
    lines = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ", f"Date: {meta['date']}  ",
             f"Model: the bench DiT (4 blocks x width 256, LoRA rank 32, 2511 targets), target {SIZE}x{SIZE} + one "
             f"{SIZE}x{SIZE} reference, fp32, gradient checkpointing on, accumulation 1; median step time over "
             f"{lv['steps']} steps after the first {lv['warmup']}, {lv['rounds']} interleaved rounds of runs.",
             "", "| lever | value | baseline (same run) | ratio (baseline / value) | loss vs baseline, same steps |",
             "|---|---|---|---|---|"]
    for name in LEVERS:
        case = cases.get(name)
        if case is None:
            continue
        if "refused" in case:
            lines.append(f"| {name} | refused here: {case['refused']} | | | |")
            continue
        value = f"{case['step_s'] * 1000:.0f} ms/step"
        if "compile_overhead_cold_s" in case:
            value += f" (compiling adds {case['compile_overhead_cold_s']:.0f} s to the first {lv['warmup']} steps"
            if "compile_overhead_warm_s" in case:
                value += f" with an empty compile cache, {case['compile_overhead_warm_s']:.0f} s with inductor's cache"
            value += ")"
        loss = f"max rel. diff {case['max_rel_loss_diff']:.1e}"
        lines.append(f"| {name} | {value} | {base['step_s'] * 1000:.0f} ms/step | {case['speedup']:.2f} | {loss} |")
    if "block_weight_bytes" in cases.get("int8 base", {}):
        q, b = cases["int8 base"], base
        lines.append(f"| int8 base: block weights | {q['block_weight_bytes'] / 2**20:.2f} MiB | fp32: "
                     f"{b['block_weight_bytes'] / 2**20:.2f} MiB | {b['block_weight_bytes'] / q['block_weight_bytes']:.2f} | |")
    return "\n".join(lines)


def bench_checkpoint(work: Path, dataset: Path, repeats: int) -> dict:
    """Writing and reading a checkpoint of the bench DiT's LoRA (rank 32) and its AdamW state, as the trainer does,
    against raw safetensors save/load of the same tensors and against one training step (fwd+bwd+AdamW)."""
    from safetensors.torch import load_file, save_file
    from edittuner.cache import CacheReader
    from edittuner.checkpoint import load_state, save_state, write_checkpoint
    from edittuner.lora import load_lora_file, lora_state_dict, save_lora, set_lora_state
    cache = _ensure_cache(work, dataset)
    model = ModelSource(transformer_dir=str(work / "transformer"))
    dit = model.load_dit()
    torch.manual_seed(0)
    inject_lora(dit, PRESETS["2511"].lora_targets, 32, 32)
    denoiser = DiTDenoiser(dit)
    optimizer = torch.optim.AdamW([p for _, p in lora_parameters(dit)], lr=1e-4)
    sample = CacheReader(cache).load(0)
    x0 = sample["target"][None]
    noise = torch.randn_like(x0)
    conditioning = collate_conditioning([sample], "cpu", torch.float32, True)
    timestep = training_scheduler().timesteps[500:501]

    def train_step():
        prediction = denoiser(latents=(x0 + noise) / 2, timestep=timestep, **conditioning)
        torch.nn.functional.mse_loss(prediction, noise - x0).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step = median_time(train_step, repeats)          # also fills AdamW's state (exp_avg, exp_avg_sq)
    metadata = {"format": "diffsynth", "rank": "32", "alpha": "32.0"}
    folder = work / "checkpoints"

    def save():
        lora, state = lora_state_dict(dit, 32, 32.0), optimizer.state_dict()

        def files(tmp: Path):
            save_lora(tmp / "lora.safetensors", lora, metadata)
            save_state(tmp, "optimizer", state)
            (tmp / "trainer_state.json").write_text(json.dumps({"step": 1}))
        write_checkpoint(folder, 1, files)

    def load():
        set_lora_state(dit, load_lora_file(folder / "step-1/lora.safetensors"), 32, 32.0)
        optimizer.load_state_dict(load_state(folder / "step-1", "optimizer"))

    raw_tensors = {f"lora.{k}": v for k, v in lora_state_dict(dit, 32, 32.0).items()}
    for i, state in optimizer.state_dict()["state"].items():
        raw_tensors.update({f"opt.{i}.{k}": v for k, v in state.items() if isinstance(v, torch.Tensor)})
    raw_tensors = {k: v.contiguous() for k, v in raw_tensors.items()}
    raw_path = work / "raw.safetensors"
    result = {"tensors": len(raw_tensors), "megabytes": sum(v.numel() * v.element_size() for v in raw_tensors.values()) / 2**20,
              "train_step_s": step,
              "save_s": median_time(save, repeats),
              "raw_save_s": median_time(lambda: save_file(raw_tensors, str(raw_path)), repeats),
              "load_s": median_time(load, repeats),
              "raw_load_s": median_time(lambda: load_file(str(raw_path)), repeats)}
    result.update({"save_over_raw": result["save_s"] / result["raw_save_s"],
                   "load_over_raw": result["load_s"] / result["raw_load_s"],
                   "save_in_steps": result["save_s"] / step, "load_in_steps": result["load_s"] / step})
    return result


def _seconds_to_first_new_step(command: list[str], env: dict, metrics: Path) -> float:
    """From process start until metrics.jsonl grows past its size at start (one new step line)."""
    start_size = metrics.stat().st_size if metrics.exists() else 0
    start = time.perf_counter()
    proc = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    first = None
    try:
        while proc.poll() is None and time.perf_counter() - start < 1800:
            # On resume the log is first cut back to the checkpoint's step: that is never longer than at start.
            if metrics.exists() and metrics.stat().st_size > start_size:
                first = time.perf_counter() - start
                break
            time.sleep(0.002)
        _, stderr = proc.communicate(timeout=1800)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed:\n{stderr[-3000:]}")
    if first is None:  # the step line and the exit fell between two polls
        first = time.perf_counter() - start
    return first


def bench_resume(work: Path, dataset: Path, repeats: int) -> dict:
    """Process start to the first logged step: `--resume latest` from a checkpoint at step 4 against a fresh run
    (same command otherwise; 1 process; the bench DiT)."""
    cache = _ensure_cache(work, dataset)
    env = _env(1)
    base = work / "resume-base"
    shutil.rmtree(base, ignore_errors=True)
    _run_timed([sys.executable, *_train_command(cache, base, 4, 1, "--save_every", "4")], env)
    fresh, resumed = [], []
    for i in range(repeats):
        run = work / f"fresh-{i}"
        shutil.rmtree(run, ignore_errors=True)
        fresh.append(_seconds_to_first_new_step([sys.executable, *_train_command(cache, run, 1, 1)], env,
                                                run / "metrics.jsonl"))
        run = work / f"resumed-{i}"
        shutil.rmtree(run, ignore_errors=True)
        shutil.copytree(base, run)
        resumed.append(_seconds_to_first_new_step([sys.executable, *_train_command(cache, run, 5, 1, "--resume", "latest")],
                                                  env, run / "metrics.jsonl"))
        assert [m["step"] for m in read_metrics(run / "metrics.jsonl")] == [1, 2, 3, 4, 5]
    result = {"fresh_first_step_s": statistics.median(fresh), "resume_first_step_s": statistics.median(resumed),
              "repeats": repeats}
    result["resume_over_fresh"] = result["resume_first_step_s"] / result["fresh_first_step_s"]
    return result


def render_processes(results: dict) -> str:
    meta = results["processes_meta"]
    lines = [f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ", f"Date: {meta['date']}  ",
             f"Model: tiny text encoder + VAE, DiT of 4 blocks x width 256 (LoRA rank 32, 2511 targets), "
             f"target {SIZE}x{SIZE} + one {SIZE}x{SIZE} reference, fp32; 2 processes = DDP over gloo; "
             "one thread per process in both cases.", "",
             "| figure | value | baseline (same run) | ratio |", "|---|---|---|---|"]
    if "phase1_processes" in results:
        p1 = results["phase1_processes"]
        lines += [
            f"| phase 1, 2 processes ({p1['samples']} samples, encoding only) | {p1['samples_per_s_2']:.2f} samples/s | "
            f"1 process: {p1['samples_per_s_1']:.2f} samples/s | {p1['speedup_2_over_1']:.2f} |",
            f"| phase 1, 2 processes, whole command (start-up, encoder load) | {p1['wall_s_2']:.1f} s | "
            f"1 process: {p1['wall_s_1']:.1f} s | {p1['wall_ratio_2_over_1']:.2f} |"]
    if "phase2_processes" in results:
        p2 = results["phase2_processes"]
        lines.append(f"| phase 2, 2 DDP processes x accumulation 1 | {p2['samples_per_s_2']:.2f} samples/s "
                     f"({p2['step_s_2'] * 1000:.0f} ms/step) | 1 process x accumulation 2: {p2['samples_per_s_1']:.2f} "
                     f"samples/s ({p2['step_s_1'] * 1000:.0f} ms/step) | {p2['speedup_2_over_1']:.2f} |")
    if "checkpoint" in results:
        ck = results["checkpoint"]
        lines += [
            f"| checkpoint save (LoRA + AdamW state, {ck['megabytes']:.1f} MiB, atomic dir) | {ck['save_s'] * 1000:.1f} ms | "
            f"raw safetensors save of the same tensors: {ck['raw_save_s'] * 1000:.1f} ms | {ck['save_over_raw']:.2f} |",
            f"| checkpoint save, in training steps | {ck['save_s'] * 1000:.1f} ms | one step (fwd+bwd+AdamW): "
            f"{ck['train_step_s'] * 1000:.1f} ms | {ck['save_in_steps']:.3f} |",
            f"| checkpoint load (load_state + set_lora_state + optimizer) | {ck['load_s'] * 1000:.1f} ms | "
            f"raw safetensors load of the same tensors: {ck['raw_load_s'] * 1000:.1f} ms | {ck['load_over_raw']:.2f} |",
            f"| checkpoint load, in training steps | {ck['load_s'] * 1000:.1f} ms | one step: "
            f"{ck['train_step_s'] * 1000:.1f} ms | {ck['load_in_steps']:.3f} |"]
    if "resume" in results:
        rs = results["resume"]
        lines.append(f"| process start to first step, `--resume latest` | {rs['resume_first_step_s']:.2f} s | "
                     f"fresh run: {rs['fresh_first_step_s']:.2f} s (median of {rs['repeats']}) | "
                     f"{rs['resume_over_fresh']:.3f} |")
    return "\n".join(lines)


def machine() -> str:
    return f"{platform.machine()}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}, torch {torch.__version__}, CPU"


def render(results: dict) -> str:
    p2, ds = results["phase2"], results["dataset"]
    lines = [
        f"Command: `{results['command']}`  ",
        f"Machine: {results['machine']}  ",
        f"Date: {results['date']}  ",
        f"Model: tiny text encoder + VAE, DiT of 4 blocks x width 256 (LoRA rank 32, 2511 targets), "
        f"target {SIZE}x{SIZE} + one {SIZE}x{SIZE} reference, fp32.",
        "",
        "| figure | value | baseline (same run) | ratio |",
        "|---|---|---|---|",
        f"| phase-2 step (cache read, loss, backward, clip, AdamW) | {p2['phase2_step_s'] * 1000:.1f} ms | bare DiT fwd+bwd+AdamW on in-memory inputs: {p2['bare_forward_backward_s'] * 1000:.1f} ms | {p2['overhead_ratio']:.3f} |",
        f"| step with online encoding (no phase 1) | {p2['online_step_s'] * 1000:.1f} ms | phase-2 step from the cache: {p2['phase2_step_s'] * 1000:.1f} ms | {p2['online_over_split_ratio']:.3f} |",
        f"| phase 1 (prompt+refs, target, refs, white) | {p2['phase1_samples_per_s']:.1f} samples/s ({p2['phase1_samples']} samples) | | |",
        f"| dataset JSON, header reads, 2 workers | {ds['rate_2_workers']:.0f} samples/s | 1 worker: {ds['rate_1_worker']:.0f} samples/s ({ds['samples']} samples) | {ds['speedup_2_over_1']:.2f} |",
        f"| dataset JSON, `--verify` (full decode), 2 workers | {ds['verify_rate_2_workers']:.0f} samples/s | 1 worker: {ds['verify_rate_1_worker']:.0f} samples/s | {ds['verify_speedup_2_over_1']:.2f} |",
        "",
        f"Dataset JSON identical with 1 and 2 workers: {ds['identical_output']}.",
        "",
        "Latent Bridge Matching (same DiT, same 256x256 sample; DiT loop only, no CFG, no VAE decode):",
        "",
        "| figure | value | baseline (same run) | ratio (baseline / value) |",
        "|---|---|---|---|",
    ]
    lbm = results["lbm"]
    for n in (1, 2, 4):
        lines.append(f"| bridge sampling, {n} step{'s' if n > 1 else ''} | {lbm[f'bridge_{n}_steps_s'] * 1000:.0f} ms | "
                     f"flow matching, 30 steps (the engine's scheduler): {lbm['flow_30_steps_s'] * 1000:.0f} ms | "
                     f"{lbm[f'flow30_over_bridge{n}']:.1f} |")
    lines.append(f"| LBM step without reference tokens (main stream) | {lbm['lbm_step_without_refs_s'] * 1000:.0f} ms | "
                 f"with them: {lbm['lbm_step_with_refs_s'] * 1000:.0f} ms | {lbm['with_over_without_refs']:.2f} |")
    sampling, previews = results["sampling"], results["previews"]
    lines += [
        "",
        f"Sampling one edit on the built-in tiny model ({SIZE}x{SIZE}; prompt and reference encoding, sampling, VAE decode):",
        "",
        "| figure | value | baseline (same run) | ratio (baseline / value) |",
        "|---|---|---|---|",
    ]
    for n in (1, 2, 4):
        lines.append(f"| bridge sampler, {n} step{'s' if n > 1 else ''} | {sampling[f'bridge_{n}_s'] * 1000:.0f} ms | "
                     f"flow, 30 steps with CFG 4: {sampling['flow_30_cfg_s'] * 1000:.0f} ms | {sampling[f'flow_over_bridge{n}']:.1f} |")
    lines += [
        "",
        f"Validation previews (bench DiT, 4 pairs, flow 20 steps with CFG, decode and grid), every {previews['interval']} steps (the default):",
        "",
        "| figure | value | baseline (same run) | ratio |",
        "|---|---|---|---|",
        f"| one preview | {previews['preview_s']:.2f} s | | |",
        f"| step + its share of previews | {(previews['step_s'] + previews['extra_per_step_s']) * 1000:.1f} ms | "
        f"phase-2 step: {previews['step_s'] * 1000:.1f} ms | {previews['step_with_previews_over_step']:.3f} |",
    ]
    return "\n".join(lines)


def update_benchmarks_md(text: str, section: str = "split-phase") -> None:
    path = ROOT / "BENCHMARKS.md"
    start, end = f"<!-- {section}:start -->", f"<!-- {section}:end -->"
    content = path.read_text()
    before, _, rest = content.partition(start)
    _, _, after = rest.partition(end)
    path.write_text(f"{before}{start}\n{text}\n{end}{after}")


SPLIT_PHASE = ("dataset", "phase2", "lbm", "sampling", "previews")
PROCESSES = ("phase1_processes", "phase2_processes", "checkpoint", "resume")
CASES = SPLIT_PHASE + PROCESSES + ("batching", "buckets", "levers", "longcat", "app", "zero_prodigy")


def parse_only(text: str | None) -> tuple[str, ...]:
    if not text:
        return CASES
    names = tuple(n.strip() for n in text.split(",") if n.strip())
    unknown = [n for n in names if n not in CASES]
    if unknown:
        raise SystemExit(f"--only: unknown case(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")
    return names


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("action", choices=["run"])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (for a smoke test)")
    parser.add_argument("--only", default=None, metavar="CASES",
                        help=f"comma-separated cases to run (default all): {', '.join(CASES)}")
    parser.add_argument("--gpu", action="store_true",
                        help="run benchmarks/real_scale.py instead: the real 20B architecture on this machine's GPU "
                             "(python -m benchmarks.real_scale --help for its own options)")
    args = parser.parse_args(argv)
    if args.gpu:
        from benchmarks.real_scale import main as real_scale
        return real_scale(["--steps", "3"] if args.quick else [])
    only = parse_only(args.only)
    torch.set_num_threads(os.cpu_count() or 1)
    steps = 4 if args.quick else 12
    command = "python -m benchmarks run" + (" --quick" if args.quick else "") + (f" --only {args.only}" if args.only else "")
    out = ROOT / "benchmarks/results"
    # Cases not run keep their figures from the last run.
    results = json.loads((out / "latest.json").read_text()) if args.only and (out / "latest.json").is_file() else {}
    work = Path(tempfile.mkdtemp(prefix="edittuner-bench-"))
    try:
        write_transformer(work / "transformer")
        dataset = make_bench_dataset(work, 4 if args.quick else 16)
        meta = {"command": command, "machine": machine(), "date": datetime.date.today().isoformat()}
        if set(only) & set(SPLIT_PHASE):
            results.update(meta)
        # Dataset generation first: its worker processes are forked, and forking after torch has run its
        # thread pools slows them down (a real `edittuner dataset` runs in a process of its own).
        if "dataset" in only:
            results["dataset"] = bench_dataset_generation(work, 200 if args.quick else 2000)
        if "phase2" in only:
            results["phase2"] = bench_phase2(work, dataset, steps)
        if "lbm" in only:
            if "phase2" not in only:
                _ensure_cache(work, dataset)
            results["lbm"] = bench_lbm(work, steps)
        if "sampling" in only:
            results["sampling"] = bench_sampling(work, 2 if args.quick else 3)
        if "previews" in only:
            results["previews"] = bench_previews(work, dataset, steps)
        if set(only) & set(PROCESSES):
            results["processes_meta"] = meta
        if "phase1_processes" in only:
            results["phase1_processes"] = bench_phase1_processes(work, dataset)
        if "phase2_processes" in only:
            results["phase2_processes"] = bench_phase2_processes(work, dataset, steps)
        if "checkpoint" in only:
            results["checkpoint"] = bench_checkpoint(work, dataset, 5 if args.quick else 15)
        if "resume" in only:
            results["resume"] = bench_resume(work, dataset, 1 if args.quick else 3)
        if "batching" in only:
            results["batching_meta"] = meta
            results["batching"] = bench_batching(work, steps, 1 if args.quick else 2)
        if "buckets" in only:
            results["buckets_meta"] = meta
            results["buckets"] = bench_buckets(work, steps, 1 if args.quick else 2)
        if "levers" in only:
            results["levers_meta"] = meta
            results["levers"] = bench_levers(work, dataset, steps, 1 if args.quick else 3)
        if "longcat" in only:
            results["longcat_meta"] = meta
            results["longcat"] = bench_longcat(work, dataset, steps, 1 if args.quick else 2)
        if "zero_prodigy" in only:
            results["zero_prodigy_meta"] = meta
            results["zero_prodigy"] = bench_zero_prodigy(work, dataset, steps, 1 if args.quick else 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2))
    if set(only) & set(SPLIT_PHASE) and all(k in results for k in SPLIT_PHASE[:-1]) and "previews" in results:
        text = render(results)
        print(text)
        if not args.quick:
            update_benchmarks_md(text)
    if set(only) & set(PROCESSES):
        text = render_processes(results)
        print(text)
        if not args.quick:
            update_benchmarks_md(text, "processes")
    # Each of these cases regenerates its own section of BENCHMARKS.md.
    for case, render_case, section in (("batching", render_batching, "batching"), ("buckets", render_buckets, "buckets"),
                                       ("levers", render_levers, "levers"), ("longcat", render_longcat, "longcat"),
                                       ("zero_prodigy", render_zero_prodigy, "zero-prodigy")):
        if case in only:
            text = render_case(results)
            print(text)
            if not args.quick:
                update_benchmarks_md(text, section)
    if "app" not in only:
        return 0
    # The app's click-to-result latency: its own module (a server on a free loopback port), same run.
    from benchmarks.app_latency import main as app_latency
    return app_latency(["--quick"] if args.quick else [])


if __name__ == "__main__":
    sys.exit(main())
