"""Benchmarks. `python -m benchmarks run [--quick]` writes benchmarks/results/latest.json and rewrites the
generated sections of BENCHMARKS.md (training, sampling, previews here; the app's latency in app_latency.py). Every figure is a ratio against a baseline timed in the same run.

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
import sys
import tempfile
import time
from pathlib import Path

import torch
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from edittuner.cache import (PrecomputeConfig, encode_images_and_prompt, make_encoding_pipe,  # noqa: E402
                             precompute_cache, prepare_images, reference_prompt_embedder)
from edittuner.dataset import GenerateConfig, generate_dataset_json, load_dataset  # noqa: E402
from edittuner.images import ResizeConfig  # noqa: E402
from edittuner.lora import PRESETS, inject_lora, lora_parameters  # noqa: E402
from edittuner.models import EditDiT, ModelSource  # noqa: E402
from edittuner.objectives import DiTDenoiser, dit_conditioning, training_scheduler  # noqa: E402
from edittuner.tiny import TINY_TEXT_DIM, build_tiny_encoders  # noqa: E402
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
    from edittuner.trainer import sample_at
    reader = CacheReader(cache)
    order = [sample_at(p, len(reader), cfg.seed) for p in range(steps + 2)]
    preloaded = []
    for index in order:
        sample = reader.load(index)
        x0 = sample["target"][None]
        preloaded.append((x0, torch.randn_like(x0), dit_conditioning(sample, "cpu", torch.float32, True)))
    timestep = training_scheduler().timesteps[500:501]
    times = []
    for x0, noise, conditioning in preloaded:
        start = time.perf_counter()
        prediction = denoiser(latents=(x0 + noise) / 2, timestep=timestep, **conditioning)
        torch.nn.functional.mse_loss(prediction, noise - x0).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    bare = statistics.median(times[2:])

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
    conditioning = dit_conditioning(sample, "cpu", torch.float32, True)
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
                                           repeats, warmup=1)}
    for n in (1, 2, 4):
        sampler = SamplerConfig(sampler="bridge", steps=n)
        result[f"bridge_{n}_s"] = median_time(lambda: editor.edit([source], prompt, sampler), repeats * 3, warmup=1)
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


def update_benchmarks_md(text: str) -> None:
    path = ROOT / "BENCHMARKS.md"
    start, end = "<!-- split-phase:start -->", "<!-- split-phase:end -->"
    content = path.read_text()
    before, _, rest = content.partition(start)
    _, _, after = rest.partition(end)
    path.write_text(f"{before}{start}\n{text}\n{end}{after}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks")
    parser.add_argument("action", choices=["run"])
    parser.add_argument("--quick", action="store_true", help="fewer repeats (for a smoke test)")
    args = parser.parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    steps = 4 if args.quick else 12
    work = Path(tempfile.mkdtemp(prefix="edittuner-bench-"))
    try:
        write_transformer(work / "transformer")
        dataset = make_bench_dataset(work, 4 if args.quick else 16)
        # Dataset generation first: its worker processes are forked, and forking after torch has run its
        # thread pools slows them down (a real `edittuner dataset` runs in a process of its own).
        generation = bench_dataset_generation(work, 200 if args.quick else 2000)
        results = {"command": "python -m benchmarks run" + (" --quick" if args.quick else ""),
                   "machine": machine(), "date": datetime.date.today().isoformat(),
                   "dataset": generation, "phase2": bench_phase2(work, dataset, steps)}
        results["lbm"] = bench_lbm(work, steps)
        results["sampling"] = bench_sampling(work, 2 if args.quick else 3)
        results["previews"] = bench_previews(work, dataset, steps)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    out = ROOT / "benchmarks/results"
    out.mkdir(parents=True, exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2))
    text = render(results)
    print(text)
    if not args.quick:
        update_benchmarks_md(text)
    # The app's click-to-result latency: its own module (a server on a free loopback port), same run.
    from benchmarks.app_latency import main as app_latency
    return app_latency(["--quick"] if args.quick else [])


if __name__ == "__main__":
    sys.exit(main())
