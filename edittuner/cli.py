"""`edittuner` command line: dataset, precompute, train, sample, demo-data, export-lora. Bad input exits 2 with one message."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .configs import PrecomputeConfig, SampleConfig, TrainConfig
from .dataset import GenerateConfig, generate_dataset_json
from .errors import EditTunerError
from .families import family_of
from .models import ModelSource
from .options import add_options, from_args


def model_source(args: argparse.Namespace) -> ModelSource:
    """The model the flags name, for the family of --model_version (the default version's when not given)."""
    return from_args(ModelSource, args, family=family_of(args.model_version).name)


def cmd_dataset(args) -> None:
    print(generate_dataset_json(from_args(GenerateConfig, args)).summary())


def cmd_precompute(args) -> None:
    from .cache import precompute_cache
    cfg = from_args(PrecomputeConfig, args, model=model_source(args))
    result = precompute_cache(cfg)
    for name, part, where in (("", result, cfg.cache_dir), (" validation", result.get("validation"),
                                                            cfg.cache_dir / "validation")):
        if part and part["manifest"] is not None:
            print(f"phase 1{name}: encoded {part['encoded']}, reused {part['skipped']} -> {where} "
                  f"({len(part['manifest']['samples'])} samples, {part['seconds']:.1f} s)")


def cmd_train(args) -> None:
    from .trainer import train
    cfg = from_args(TrainConfig, args, model=model_source(args))
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
    from .sampling import sample_images
    cfg = from_args(SampleConfig, args, model=model_source(args))
    for output, result in sample_images(cfg):
        roundoff = ""
        if result.vae_roundoff_outside_mask is not None:
            roundoff = (f"; outside the mask the VAE round trip alone moves pixels by "
                        f"{result.vae_roundoff_outside_mask:.2f}/255 on average"
                        + (" (source pixels kept there)" if cfg.sampler.keep_unmasked_pixels else ""))
        print(f"wrote {output} ({result.seconds:.1f} s){roundoff}")


def cmd_demo_data(args) -> None:
    from .demo import make_demo_dataset
    print(make_demo_dataset(Path(args.out), size=args.size))


def cmd_export_lora(args) -> None:
    from .lora import export_lora
    source_format = export_lora(Path(args.input), Path(args.output), args.format)
    print(f"{args.input} ({source_format}) -> {args.output} ({args.format})")


def _command(sub, name: str, func, summary: str, config: type | None = None) -> argparse.ArgumentParser:
    """A subcommand running ``func``, with an option per field of ``config``."""
    parser = sub.add_parser(name, help=summary)
    if config is not None:
        add_options(parser, config)
    parser.set_defaults(func=func)
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edittuner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _command(sub, "dataset", cmd_dataset, "raw folder -> dataset JSON (= generate_dataset_json_mp.py)", GenerateConfig)
    _command(sub, "precompute", cmd_precompute, "phase 1: encode prompts (with references) and latents into a cache",
             PrecomputeConfig)
    p = _command(sub, "train", cmd_train, "phase 2: LoRA-train the DiT from a phase-1 cache", TrainConfig)
    p.add_argument("--dry_run", action="store_true",
                   help="check every setting, the output folder and the model folder, load nothing and exit")
    _command(sub, "sample", cmd_sample, "edit an image (or every row of a dataset JSON) with the base model and an "
             "optional LoRA", SampleConfig)

    p = _command(sub, "demo-data", cmd_demo_data, "make the demo raw folder and dataset JSON from scikit-image's "
                 "sample photos")
    p.add_argument("--out", default="data/demo")
    p.add_argument("--size", type=int, default=96, help="side of the demo images (default 96)")

    p = _command(sub, "export-lora", cmd_export_lora, "convert a LoRA file between the diffsynth, comfyui and "
                 "diffusers layouts")
    p.add_argument("--input", required=True, help="LoRA safetensors file in any of the three layouts (detected from its keys)")
    p.add_argument("--output", required=True, help="file to write")
    p.add_argument("--format", required=True,
                   help="diffsynth (ours: diffusion_model.<module>.lora_A/B, scale folded), comfyui (the same plus "
                        "<module>.alpha, lora_B unfolded) or diffusers (transformer.<module>.lora_A/B, scale folded)")
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
