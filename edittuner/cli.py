"""`edittuner` command line: dataset, precompute, train, check, plan, sample, evaluate, plot, demo-data, export-lora.
Bad input exits 2 with
one message; under a launcher it names the launcher's variable that set the flag."""

from __future__ import annotations

import argparse
import os
import re
import sys
from itertools import groupby
from pathlib import Path

from .configs import EvaluateConfig, PlanConfig, PrecomputeConfig, SampleConfig, TrainConfig
from .dataset import GenerateConfig, generate_dataset_json
from .errors import EditTunerError
from .families import family_of
from .models import ModelSource
from .options import add_options, from_args, positive_int

# Set by scripts/launch.sh: its name, and "VAR=--flag ..." for each flag one of its variables sets.
LAUNCHER_ENV, VARIABLES_ENV = "EDITTUNER_LAUNCHER", "EDITTUNER_VARIABLES"


def model_source(args: argparse.Namespace) -> ModelSource:
    """The model the flags name, for the family of --model_version (the default version's when not given)."""
    return from_args(ModelSource, args, family=family_of(args.model_version).name)


def cmd_dataset(args) -> None:
    print(generate_dataset_json(from_args(GenerateConfig, args)).summary())


def cmd_precompute(args) -> None:
    from .cache import precompute_cache
    cfg = from_args(PrecomputeConfig, args, model=model_source(args))
    result = precompute_cache(cfg)
    parts = [(f" source {name}", part, cfg.cache_dir / "sources" / name)
             for name, part in result.get("sources", {}).items()]
    for name, part, where in [("", result, cfg.cache_dir), *parts,
                              (" validation", result.get("validation"), cfg.cache_dir / "validation")]:
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
        edits = edit_metrics_line(result)
        if edits:
            print(edits)


def edit_metrics_line(summary: dict) -> str | None:
    """The previews' edit metrics before and after training, from a run's summary, in one line."""
    def pair(key, unit="", digits=2):
        start, end = summary.get(f"val_{key}_start"), summary.get(f"val_{key}_end")
        if end is None:
            return None
        return f"{'?' if start is None else f'{start:.{digits}f}'} -> {end:.{digits}f}{unit}"
    parts = [(name, pair(key, unit, digits)) for name, key, unit, digits in (
        ("PSNR", "psnr", " dB", 2), ("SSIM", "ssim", "", 4), ("PSNR in mask", "psnr_in_mask", " dB", 2),
        ("L1 in mask", "l1_in_mask", "", 2),
        ("L1 outside mask", "l1_outside_mask", "", 2), ("validation eval loss", "eval_loss", "", 4))]
    parts = [f"{name} {value}" for name, value in parts if value]
    return "validation edit metrics (before -> after; L1 in 8-bit levels): " + ", ".join(parts) if parts else None


def cmd_check(args) -> None:
    from .preflight import check_launch, check_machines
    train_flags = args.train_flags[1:] if args.train_flags[:1] == ["--"] else args.train_flags
    phase_1 = from_args(PrecomputeConfig, args, model=model_source(args))
    phase_2 = None
    if train_flags:
        train_args = build_parser().parse_args(["train", *train_flags])
        phase_2 = from_args(TrainConfig, train_args, model=model_source(train_args))
    check_machines(args.num_processes, args.num_machines, args.machine_rank, args.main_process_ip,
                   args.main_process_port)
    check_launch(phase_1, phase_2, args.accelerate_config)
    print(f"check: settings of phase 1{' and phase 2' if phase_2 else ''} checked, nothing loaded or written")


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


def cmd_evaluate(args) -> None:
    from .metrics import evaluate_predictions
    report = evaluate_predictions(from_args(EvaluateConfig, args))
    print(report["table"], end="")
    if report["ignored_files"]:
        shown = ", ".join(report["ignored_files"][:5]) + (" ..." if len(report["ignored_files"]) > 5 else "")
        print(f"note: {len(report['ignored_files'])} image(s) in {args.predictions} match no row's id and were left "
              f"out: {shown}")
    print(f"wrote {report['json']} and {report['markdown']}")


def cmd_plot(args) -> None:
    from .plots import plot_metrics
    print(f"wrote {plot_metrics(Path(args.run_dir))}")


def cmd_plan(args) -> None:
    from .plan import main
    print(main(from_args(PlanConfig, args)))


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


class UsageError(Exception):
    """argparse's complaint about the command line, reported by ``main``."""

    def __init__(self, parser: argparse.ArgumentParser, message: str):
        super().__init__(message)
        self.parser = parser


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(self, message)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="edittuner", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    _command(sub, "dataset", cmd_dataset, "raw folder -> dataset JSON (= generate_dataset_json_mp.py)", GenerateConfig)
    _command(sub, "precompute", cmd_precompute, "phase 1: encode prompts (with references) and latents into a cache",
             PrecomputeConfig)
    p = _command(sub, "train", cmd_train, "phase 2: LoRA-train the DiT from a phase-1 cache", TrainConfig)
    p.add_argument("--dry_run", action="store_true",
                   help="check every setting, the output folder and the model folder, load nothing and exit")
    p = _command(sub, "check", cmd_check, "check phase 1's flags, files and folders, and with `-- <train flags>` "
                 "phase 2's (train --dry_run), loading nothing: what the launchers run first", PrecomputeConfig)
    p.add_argument("--accelerate_config", help="the accelerate config the phases will be launched with (a DeepSpeed "
                   "one: phase 2 is checked under ZeRO)")
    p.add_argument("--num_processes", type=positive_int, default=1, help="processes the phases will be launched with "
                   "(all machines together, as accelerate counts them)")
    p.add_argument("--num_machines", type=positive_int, default=1, help="machines the phases will be launched on")
    p.add_argument("--machine_rank", type=int, default=0, help="this machine's rank (0 = the main machine)")
    p.add_argument("--main_process_ip", default=None, help="the main machine's address (several machines)")
    p.add_argument("--main_process_port", type=int, default=None, help="the main machine's port (several machines)")
    p.add_argument("train_flags", nargs=argparse.REMAINDER, help="-- then the flags of `edittuner train`")
    _command(sub, "plan", cmd_plan, "will it fit: phase 2's and phase 1's memory per GPU, step FLOPs and time, and "
             "the lever sets that fit a card, for the released model (nothing loaded)", PlanConfig)
    _command(sub, "sample", cmd_sample, "edit an image (or every row of a dataset JSON) with the base model and an "
             "optional LoRA", SampleConfig)

    _command(sub, "evaluate", cmd_evaluate, "edit metrics (PSNR, SSIM, L1 inside / outside the edit mask) of a "
             "folder of predictions against a dataset JSON's targets: JSON and a Markdown table", EvaluateConfig)
    p = _command(sub, "plot", cmd_plot, "write <run_dir>/metrics.png from a training run's metrics.jsonl")
    p.add_argument("run_dir", help="the --output_dir of a training run")

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


def launcher_variable(flag: str | None, argv: list[str]) -> str | None:
    """'VAR=value (--flag)' when the launcher's variable VAR set ``flag``: users set variables, not flags. Not
    when ``flag`` is given twice in a part of ``argv`` (parts: split at --): then an extra argument overrode it."""
    variables = dict(item.split("=", 1)[::-1] for item in os.environ.get(VARIABLES_ENV, "").split() if "=" in item)
    if flag not in variables:
        return None
    for part in (list(p) for separator, p in groupby(argv, lambda a: a == "--") if not separator):
        given = [i for i, a in enumerate(part) if a == flag or a.startswith(flag + "=")]
        if len(given) > 1:
            return None
        if given:
            value = part[given[0] + 1] if part[given[0]] == flag and given[0] + 1 < len(part) else ""
            return f"{variables[flag]}={value} ({flag})"
    return None


def _report(prog: str, message: str, flag: str | None, argv: list[str]) -> int:
    """One line on stderr naming the culprit (the launcher's variable where one set ``flag``); exit status 2."""
    variable = launcher_variable(flag, argv)
    prog = os.environ.get(LAUNCHER_ENV) or prog
    print(f"{prog}: error: {variable + ': ' if variable else ''}{message}", file=sys.stderr)
    return 2


def _usage_error(exc: UsageError, argv: list[str]) -> int:
    """argparse's usage and message (SystemExit 2); where a launcher's variable set the flag, one line naming it."""
    about = re.match(r"argument (--\w+)(?:/-+\w+)*: (.*)", str(exc), re.S)
    if about and launcher_variable(about[1], argv):
        return _report(exc.parser.prog, about[2], about[1], argv)
    argparse.ArgumentParser.error(exc.parser, str(exc))


def main(argv: list[str] | None = None) -> int:
    argv = [str(a) for a in (sys.argv[1:] if argv is None else argv)]
    prog = f"edittuner {argv[0]}" if argv else "edittuner"
    try:
        args = build_parser().parse_args(argv)
        args.func(args)
    except UsageError as exc:
        return _usage_error(exc, argv)
    except EditTunerError as exc:
        starts = re.match(r"--\w+", str(exc))
        return _report(prog, str(exc), exc.flag or (starts and starts[0]), argv)
    except OSError as exc:  # the machine said no (permissions, a full disk, a file where a folder should be)
        where = f"{exc.filename}: " if exc.filename else ""
        return _report(prog, f"{where}{exc.strerror or exc}; check that path (permissions, free space) and run "
                       "again: nothing already written was replaced", None, argv)
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
