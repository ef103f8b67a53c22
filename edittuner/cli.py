"""`edittuner` command line: dataset, precompute, train, sample, demo-data, export-lora. Bad input exits 2 with one message."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import defaults
from .errors import EditTunerError, check_seed
from .families import DEFAULT_MODEL_VERSION, VERSIONS
from .performance import ATTENTION, BASE_QUANTIZATION


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _seed(text: str) -> int:
    try:
        return check_seed(int(text))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    except EditTunerError as exc:
        raise argparse.ArgumentTypeError(str(exc).removeprefix("--seed ")) from None


def _on_off(text: str) -> bool:
    if text.lower() in ("on", "true", "1", "yes"):
        return True
    if text.lower() in ("off", "false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{text!r}: use on or off")


def _float_list(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected comma-separated numbers, e.g. 0,0.25,0.5,0.75") from None


DATA_ROOT_HELP = ("folder every dataset path must lie inside (symlinks followed); then relative paths may use '..' "
                  "within it (default: $EDITTUNER_DATA_ROOT; without one, paths may not leave the JSON's folder)")


def add_model_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("model")
    group.add_argument("--model_dir", default="tiny",
                       help="local Qwen-Image-Edit folder in the official layout, or 'tiny' for the built-in model")
    group.add_argument("--tiny_seed", type=_seed, default=0, help="seed the tiny model is made from (default 0)")
    for component in ("transformer", "text_encoder", "vae", "processor"):
        group.add_argument(f"--{component}_dir", default=None,
                           help=f"override the {component}/ folder (e.g. Qwen-Image's {component} with 2511's DiT)")


def add_resize_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("resize (part of the cache's identity: use the same values in both phases)")
    group.add_argument("--max_pixels", type=_positive_int, default=1024 * 1024,
                       help="scale target images down to at most this many pixels (default 1048576 = 1024^2)")
    group.add_argument("--multiple", type=int, default=16, help="floor width/height to a multiple of 16, 32 or 64 (default 16)")
    group.add_argument("--ref_max_pixels", type=_positive_int, default=None,
                       help="pixel budget for reference images (default: --max_pixels)")
    group.add_argument("--vl_pixels", type=_positive_int, default=384 * 384,
                       help="area references are resized to for the Qwen2.5-VL encoder (default 147456 = 384^2, as the engine)")


def resize_from_args(args):
    from .images import ResizeConfig
    return ResizeConfig(max_pixels=args.max_pixels, multiple=args.multiple, ref_max_pixels=args.ref_max_pixels,
                        vl_pixels=args.vl_pixels)


def cmd_dataset(args) -> None:
    from .dataset import GenerateConfig, generate_dataset_json
    cfg = GenerateConfig(raw_dir=Path(args.raw_dir), output=Path(args.output), prompt=args.prompt,
                         workers=args.workers, verify=args.verify, min_size=args.min_size,
                         strict_size=args.strict_size, val_fraction=args.val_fraction, split_seed=args.split_seed)
    print(generate_dataset_json(cfg).summary())


def cmd_precompute(args) -> None:
    from .cache import PrecomputeConfig, precompute_cache
    from .models import model_source_from_args
    cfg = PrecomputeConfig(dataset_json=Path(args.dataset_json), cache_dir=Path(args.cache_dir),
                           model=model_source_from_args(args), resize=resize_from_args(args),
                           model_version=args.model_version, dtype=args.cache_dtype, overwrite=args.overwrite,
                           validation_json=Path(args.validation_json) if args.validation_json else None,
                           data_root=Path(args.data_root) if args.data_root else None)
    result = precompute_cache(cfg)
    for name, part, where in (("", result, cfg.cache_dir), (" validation", result.get("validation"),
                                                            cfg.cache_dir / "validation")):
        if part and part["manifest"] is not None:
            print(f"phase 1{name}: encoded {part['encoded']}, reused {part['skipped']} -> {where} "
                  f"({len(part['manifest']['samples'])} samples, {part['seconds']:.1f} s)")


def cmd_train(args) -> None:
    from .models import model_source_from_args
    from .objectives import BridgeConfig, FlowMatchConfig
    from .performance import PerformanceConfig
    from .trainer import TrainConfig, train
    weights = {"masked_weight": args.masked_loss_weight, "unmasked_weight": args.unmasked_loss_weight}
    cfg = TrainConfig(
        cache_dir=Path(args.cache_dir), output_dir=Path(args.output_dir), model=model_source_from_args(args),
        model_version=args.model_version, resize=resize_from_args(args), max_steps=args.max_steps,
        learning_rate=args.learning_rate, warmup_steps=args.warmup_steps, weight_decay=args.weight_decay,
        max_grad_norm=args.max_grad_norm, rank=args.rank, alpha=args.alpha,
        gradient_accumulation=args.gradient_accumulation, batch_size=args.batch_size, zero_cond_t=args.zero_cond_t,
        lora_targets=tuple(args.lora_targets.split(",")) if args.lora_targets else None, seed=args.seed,
        save_every=args.save_every, keep_last=args.keep_last, gradient_checkpointing=args.gradient_checkpointing,
        mixed_precision=args.mixed_precision, resume=args.resume, overwrite=args.overwrite,
        eval_samples=args.eval_samples,
        eval_every=args.eval_every, objective=args.objective, optimizer=args.optimizer, report_to=args.report_to,
        deepspeed_config=Path(args.deepspeed_config) if args.deepspeed_config else None,
        validation_steps=args.validation_steps, validation_samples=args.validation_samples,
        validation_inference_steps=args.validation_inference_steps, validation_guidance=args.validation_guidance,
        flow=FlowMatchConfig(min_timestep_boundary=args.min_timestep_boundary,
                             max_timestep_boundary=args.max_timestep_boundary, **weights),
        bridge=BridgeConfig(sigma=args.bridge_sigma, sub_stream_probability=args.sub_stream_probability,
                            timestep_sampling=args.bridge_timesteps,
                            discrete_timesteps=args.discrete_timesteps,
                            discrete_probabilities=args.discrete_probabilities,
                            logit_normal_mean=args.logit_normal_mean, logit_normal_std=args.logit_normal_std,
                            main_stream_references=args.main_stream_references,
                            normalize_velocity=args.normalize_velocity, **weights),
        performance=PerformanceConfig(attention=args.attention, compile=args.compile,
                                      base_quantization=args.base_quantization, offload_blocks=args.offload_blocks))
    if args.dry_run:
        from .trainer import check_train
        check_train(cfg)
        print(f"train: settings checked, {cfg.output_dir} is ready (--dry_run: nothing loaded or written)")
        return
    result = train(cfg)
    if result["lora"] and int(os.environ.get("RANK", "0")) == 0:  # one line per run, not per process
        evals = ""
        if result.get("eval_loss_start") is not None:
            evals = f", fixed-noise eval loss {result['eval_loss_start']:.4f} -> {result['eval_loss_end']:.4f}"
        if result.get("bridge_1step_distance_ratio_start") is not None:
            evals += (f", 1-step bridge distance to target / source distance "
                      f"{result['bridge_1step_distance_ratio_start']:.3f} -> {result['bridge_1step_distance_ratio_end']:.3f}")
        print(f"phase 2: {result['steps']} steps{evals} -> {result['lora']}")


def cmd_sample(args) -> None:
    from .models import model_source_from_args
    from .sampling import SampleConfig, SamplerConfig, sample_images
    sampler = SamplerConfig(sampler=args.sampler, steps=args.steps, guidance=args.guidance,
                            negative_prompt=args.negative_prompt, seed=args.seed, stream=args.stream,
                            bridge_sigma=args.bridge_sigma, main_stream_references=args.main_stream_references,
                            keep_unmasked_pixels=args.keep_unmasked_pixels)
    cfg = SampleConfig(references=tuple(Path(p) for p in args.image or ()), prompt=args.prompt or "",
                       output=Path(args.output) if args.output else None, mask=Path(args.mask) if args.mask else None,
                       dataset_json=Path(args.dataset_json) if args.dataset_json else None,
                       output_dir=Path(args.output_dir) if args.output_dir else None,
                       use_dataset_masks=args.use_dataset_masks, model=model_source_from_args(args),
                       data_root=Path(args.data_root) if args.data_root else None,
                       model_version=args.model_version, zero_cond_t=args.zero_cond_t,
                       lora=Path(args.lora) if args.lora else None,
                       lora_strength=args.lora_strength, sampler=sampler, resize=resize_from_args(args),
                       base_quantization=args.base_quantization)
    for output, result in sample_images(cfg):
        roundoff = ""
        if result.vae_roundoff_outside_mask is not None:
            roundoff = (f"; outside the mask the VAE round trip alone moves pixels by "
                        f"{result.vae_roundoff_outside_mask:.2f}/255 on average"
                        + (" (source pixels kept there)" if sampler.keep_unmasked_pixels else ""))
        print(f"wrote {output} ({result.seconds:.1f} s){roundoff}")


def cmd_demo_data(args) -> None:
    from .demo import make_demo_dataset
    print(make_demo_dataset(Path(args.out), size=args.size))


def cmd_export_lora(args) -> None:
    from .lora import export_lora
    source_format = export_lora(Path(args.input), Path(args.output), args.format)
    print(f"{args.input} ({source_format}) -> {args.output} ({args.format})")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edittuner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("dataset", help="raw folder -> dataset JSON (= generate_dataset_json_mp.py)")
    p.add_argument("--raw_dir", required=True, help="folder with target/, source/ [source_2/ source_3/ ref_gt/ mask/]")
    p.add_argument("--output", required=True, help="dataset JSON to write")
    p.add_argument("--prompt", default=None, help="one prompt for samples without a .txt or prompts.jsonl entry")
    p.add_argument("--workers", type=int, default=max(1, min(8, os.cpu_count() or 1)), help="processes (default: cores, max 8)")
    p.add_argument("--verify", action="store_true", help="fully decode every image (slower; catches truncated files)")
    p.add_argument("--min_size", type=int, default=64, help="skip images whose shorter side is below this (default 64)")
    p.add_argument("--strict_size", action="store_true", help="also require references and ref_gt to match the target size")
    p.add_argument("--val_fraction", type=float, default=0.0, help="fraction held out to <output>_val.json (default 0)")
    p.add_argument("--split_seed", type=int, default=0, help="seed of the train/val split (default 0)")
    p.set_defaults(func=cmd_dataset)

    p = sub.add_parser("precompute", help="phase 1: encode prompts (with references) and latents into a cache")
    p.add_argument("--dataset_json", required=True)
    p.add_argument("--cache_dir", required=True)
    p.add_argument("--model_version", default=DEFAULT_MODEL_VERSION, choices=VERSIONS,
                   help="sets the prompt template and the references a row may have; recorded in the manifest")
    p.add_argument("--cache_dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="auto: bfloat16 on GPU, float32 on CPU")
    p.add_argument("--overwrite", action="store_true", help="re-encode a cache made with other settings")
    p.add_argument("--validation_json", default=None,
                   help="validation pairs (e.g. the generator's <dataset>_val.json), encoded into <cache_dir>/validation "
                        "for phase 2's previews")
    p.add_argument("--data_root", default=None, help=DATA_ROOT_HELP)
    add_model_args(p)
    add_resize_args(p)
    p.set_defaults(func=cmd_precompute)

    p = sub.add_parser("train", help="phase 2: LoRA-train the DiT from a phase-1 cache")
    p.add_argument("--cache_dir", required=True)
    p.add_argument("--output_dir", required=True, help="run directory (config.json, metrics.jsonl, checkpoints/, lora.safetensors)")
    p.add_argument("--model_version", default=DEFAULT_MODEL_VERSION, choices=VERSIONS,
                   help="preset: LoRA targets, zero_cond_t, accumulation")
    p.add_argument("--max_steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--objective", default="flow", choices=["flow", "lbm"], help="flow matching (default) or Latent Bridge Matching")
    p.add_argument("--optimizer", default="adamw", choices=["adamw", "prodigy_sf"],
                   help="adamw (default) or ProdigyPlusScheduleFree (lr 1.0, constant, no clipping)")
    p.add_argument("--learning_rate", type=float, default=None, help="constant after warm-up (default: adamw 1e-4, prodigy_sf 1.0)")
    p.add_argument("--warmup_steps", type=int, default=0, help="linear warm-up steps (default 0; adamw only)")
    p.add_argument("--weight_decay", type=float, default=0.01)
    p.add_argument("--max_grad_norm", type=float, default=None, help="gradient clipping; 0 disables (default: adamw 1.0; refused with prodigy_sf)")
    p.add_argument("--rank", type=int, default=32, help="LoRA rank (default 32)")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: rank)")
    p.add_argument("--gradient_accumulation", type=int, default=None, help="default from the preset (2509: 1, 2511: 16)")
    p.add_argument("--batch_size", type=int, default=1,
                   help="samples per micro-step (default 1); samples of equal latent shapes share one DiT forward, "
                        "the loss is the mean over the micro-step's samples (flow objective; not under DeepSpeed)")
    p.add_argument("--zero_cond_t", type=_on_off, default=None, help="on/off; default from the preset (2511 on, 2509 off)")
    p.add_argument("--lora_targets", default=None, help="comma-separated module suffixes (default from the preset)")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--save_every", type=int, default=defaults.SAVE_EVERY,
                   help=f"checkpoint every N steps (default {defaults.SAVE_EVERY})")
    p.add_argument("--keep_last", type=int, default=None, help="keep only the newest K checkpoints")
    p.add_argument("--gradient_checkpointing", type=_on_off, default=True, help="on/off (default on)")
    p.add_argument("--mixed_precision", default="auto", help="auto (bf16 on GPU, fp32 on CPU), no, bf16")
    p.add_argument("--resume", default=None,
                   help="'latest' or a checkpoint directory; the new lr, warm-up, weight decay, clipping and step "
                        "count apply from the next step, a change to anything else is refused")
    p.add_argument("--overwrite", action="store_true",
                   help="a fresh run may replace an earlier run in --output_dir (its checkpoints, LoRA, metrics); "
                        "without it such a folder is refused")
    p.add_argument("--dry_run", action="store_true",
                   help="check every setting, the output folder and the model folder, load nothing and exit")
    p.add_argument("--eval_samples", type=int, default=8, help="cache samples in the fixed-noise eval loss (default 8)")
    p.add_argument("--eval_every", type=int, default=0, help="log the eval loss every N steps (0: start and end only)")
    p.add_argument("--deepspeed_config", default=None,
                   help="DeepSpeed JSON (e.g. accelerate_configs/zero3.json): train under ZeRO, driven directly "
                        "(launch with torchrun or accelerate launch --config_file accelerate_configs/zero3.yaml)")
    p.add_argument("--report_to", default="auto", choices=["auto", "wandb", "none"],
                   help="auto (default): wandb when WANDB_API_KEY or WANDB_MODE is set, else none; project from "
                        "WANDB_PROJECT (default qwen-image), run name from WANDB_NAME")
    p.add_argument("--validation_steps", type=int, default=None,
                   help="write a preview grid every N steps (default 250 when phase 1 encoded --validation_json; 0: off)")
    p.add_argument("--validation_samples", type=int, default=4, help="validation pairs per preview (default 4)")
    p.add_argument("--validation_inference_steps", type=int, default=None,
                   help="sampling steps of the previews (default: flow 20 with CFG, lbm 1 bridge step)")
    p.add_argument("--validation_guidance", type=float, default=4.0, help="CFG scale of flow previews (default 4)")
    p.add_argument("--min_timestep_boundary", type=float, default=0.0)
    p.add_argument("--max_timestep_boundary", type=float, default=1.0)
    lbm = p.add_argument_group("Latent Bridge Matching (--objective lbm)")
    lbm.add_argument("--bridge_sigma", type=float, default=0.01, help="bridge noise sigma (default 0.01)")
    lbm.add_argument("--sub_stream_probability", type=float, default=0.1,
                     help="probability that a sample starts from the white image instead of the reference (default 0.1)")
    lbm.add_argument("--bridge_timesteps", default="discrete", choices=["uniform", "logit_normal", "discrete"],
                     help="bridge-time sampling (default discrete: the paper's 4 equally spaced times)")
    lbm.add_argument("--discrete_timesteps", type=_float_list, default=(0.0, 0.25, 0.5, 0.75), help="bridge times t (0 = source) for discrete sampling")
    lbm.add_argument("--discrete_probabilities", type=_float_list, default=(0.25, 0.25, 0.25, 0.25), help="their probabilities")
    lbm.add_argument("--logit_normal_mean", type=float, default=0.0)
    lbm.add_argument("--logit_normal_std", type=float, default=1.0)
    lbm.add_argument("--main_stream_references", type=_on_off, default=True,
                     help="give the DiT the reference tokens in the main stream (default on; off halves the sequence)")
    lbm.add_argument("--normalize_velocity", type=_on_off, default=False, help="variance-normalised velocity loss (default off)")
    p.add_argument("--masked_loss_weight", type=float, default=1.0, help="loss weight inside the mask (default 1)")
    p.add_argument("--unmasked_loss_weight", type=float, default=1.0, help="loss weight outside the mask (default 1)")
    speed = p.add_argument_group("speed and memory (BENCHMARKS.md: when to use each)")
    speed.add_argument("--attention", default="auto", choices=list(ATTENTION),
                       help="attention kernel: auto (default: the engine's, FlashAttention-3 if installed, else "
                            "PyTorch SDPA's own pick), sdpa, or one SDPA kernel: flash, efficient, cudnn, math")
    speed.add_argument("--compile", type=_on_off, default=False,
                       help="torch.compile the transformer blocks (default off; the first steps pay the compile time)")
    speed.add_argument("--base_quantization", default="none", choices=list(BASE_QUANTIZATION),
                       help="frozen base weights of the blocks in int8 or fp8 (GPU, sm89+) via torchao; the LoRA "
                            "trains in the compute dtype on top (default none)")
    speed.add_argument("--offload_blocks", type=_on_off, default=False,
                       help="keep the frozen block weights in host memory and copy each block to the GPU as it runs "
                            "(small cards; needs gradient checkpointing; default off)")
    add_model_args(p)
    add_resize_args(p)
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("sample", help="edit an image (or every row of a dataset JSON) with the base model and an optional LoRA")
    p.add_argument("--image", action="append", help="reference image; repeat for up to 3 (the first is edited)")
    p.add_argument("--prompt", default=None, help="the edit instruction")
    p.add_argument("--output", default=None, help="image file to write (.png, .jpg, .webp)")
    p.add_argument("--mask", default=None, help="optional mask over the first image: white = regenerate, the rest is kept")
    p.add_argument("--dataset_json", default=None, help="batch mode: one edit per row, written to --output_dir/<id>.png")
    p.add_argument("--output_dir", default=None, help="batch mode output folder")
    p.add_argument("--use_dataset_masks", action="store_true", help="batch mode: use each row's back_mask as --mask")
    p.add_argument("--data_root", default=None, help=DATA_ROOT_HELP)
    p.add_argument("--model_version", default=None, choices=VERSIONS,
                   help=f"prompt template, references taken and zero_cond_t (default: the version the --lora was "
                        f"trained for, from its metadata, else {DEFAULT_MODEL_VERSION}); a warning where it overrides "
                        "the LoRA's")
    p.add_argument("--zero_cond_t", type=_on_off, default=None,
                   help="on/off (default: as the --lora was trained, from its metadata, else the version's preset); a "
                        "warning where it overrides the LoRA's")
    p.add_argument("--lora", default=None, help="LoRA file (e.g. train/<run>/lora.safetensors)")
    p.add_argument("--lora_strength", type=float, default=1.0)
    p.add_argument("--sampler", default="flow", choices=["flow", "bridge"],
                   help="flow: the engine's flow matching from noise with CFG; bridge: Latent Bridge Matching")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: flow 30, bridge 1)")
    p.add_argument("--guidance", type=float, default=4.0, help="flow: true CFG scale; 1 disables it (default 4)")
    p.add_argument("--negative_prompt", default=" ", help="flow: the CFG negative prompt (default ' ')")
    p.add_argument("--seed", type=_seed, default=0)
    p.add_argument("--stream", default="main", choices=["main", "sub"],
                   help="bridge: start from the first reference (main) or from a white image (sub)")
    p.add_argument("--bridge_sigma", type=float, default=0.0, help="bridge: stochastic term of the steps (default 0)")
    p.add_argument("--main_stream_references", type=_on_off, default=True)
    p.add_argument("--base_quantization", default="none", choices=list(BASE_QUANTIZATION),
                   help="the DiT's blocks in int8 or fp8 (GPU, sm89+), about half the memory of bf16 (default none)")
    p.add_argument("--keep_unmasked_pixels", type=_on_off, default=True,
                   help="with --mask: paste the source's pixels back outside the mask (default on)")
    add_model_args(p)
    add_resize_args(p)
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("demo-data", help="make the demo raw folder and dataset JSON from scikit-image's sample photos")
    p.add_argument("--out", default="data/demo")
    p.add_argument("--size", type=int, default=96, help="side of the demo images (default 96)")
    p.set_defaults(func=cmd_demo_data)

    p = sub.add_parser("export-lora", help="convert a LoRA file between the diffsynth, comfyui and diffusers layouts")
    p.add_argument("--input", required=True, help="LoRA safetensors file in any of the three layouts (detected from its keys)")
    p.add_argument("--output", required=True, help="file to write")
    p.add_argument("--format", required=True,
                   help="diffsynth (ours: diffusion_model.<module>.lora_A/B, scale folded), comfyui (the same plus "
                        "<module>.alpha, lora_B unfolded) or diffusers (transformer.<module>.lora_A/B, scale folded)")
    p.set_defaults(func=cmd_export_lora)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except EditTunerError as exc:
        print(f"edittuner {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:  # the machine said no (permissions, a full disk, a file where a folder should be)
        where = f" {exc.filename}" if exc.filename else ""
        print(f"edittuner {args.command}: error:{where}: {exc.strerror or exc}; check that path (permissions, "
              "free space) and run again: nothing already written was replaced", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"edittuner {args.command}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
