"""Fit the built-in tiny models' DiTs into bases that reproduce their first reference, and write them as the
weights the tiny models load.

    python scripts/fit_tiny_dit.py [--family qwen|longcat|all] [--steps N] [--check]

A random DiT outputs noise whatever its LoRA learns in a minute: a demo trained on it cannot show an edit. A real
edit model starts out knowing how to keep the picture it is given; its LoRA only learns the change. This gives the
tiny model that starting point: its DiT (its own classes, TINY_DIT sizes, from the seeded init) is trained with the
engine's flow-matching loss on "edits" whose target is the first reference itself, over the demo's training
sources (random crops of their latents, upside down half the time; the held-out validation photos are never
seen), under 2511's and 2509's switches, with the prompt or the empty negative prompt. It learns no edit.

Written to ``edittuner/families/qwen_image_edit/tiny_dit.safetensors`` (fit settings and measurements in its
metadata), which tiny seed 0 (the default, the demo's) loads; other seeds stay random inits for tests that need
distinct models. Deterministic on one machine (seeded data order, crops, noise, init); another CPU may round
differently, so a rerun there gives close, not bitwise equal, weights. ``--check`` measures the committed file
and writes nothing: how far an 8-step sample (guidance 1) lands from the reference latents on the held-out pairs,
and the PSNR of its decode against the reference photo.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from edittuner.atomic import atomic_path  # noqa: E402

SEED = 0
# Per family: its tiny module, the versions whose switches the fit takes in turn, the demo rows it can encode.
FAMILIES = {
    "qwen": ("edittuner.families.qwen_image_edit.tiny", ("2511", "2509"), "dataset"),
    "longcat": ("edittuner.families.longcat_image_edit.tiny", ("longcat",), "dataset_single_ref"),
}
FIT_STEPS = {"qwen": 8000, "longcat": 8000}   # what made the committed files (see --check)


def demo_caches(folder: Path, family: str):
    """The demo pairs encoded by the family's tiny model (train and held-out), as cache readers."""
    from edittuner.cache import CacheReader, PrecomputeConfig, precompute_cache
    from edittuner.demo import make_demo_dataset
    from edittuner.families import model_spec
    from edittuner.images import ResizeConfig
    from edittuner.models import ModelSource

    _, versions, rows = FAMILIES[family]
    if not (folder / "demo/dataset.json").is_file():
        make_demo_dataset(folder / "demo")
    cache = folder / f"cache_{family}"
    precompute_cache(PrecomputeConfig(dataset_json=folder / f"demo/{rows}.json", cache_dir=cache,
                                      model=ModelSource(family=model_spec(versions[0]).family.name),
                                      model_version=versions[0], resize=ResizeConfig(max_pixels=96 * 96),
                                      negative_prompts=True, validation_json=folder / f"demo/{rows}_val.json"),
                     progress=False)
    return CacheReader(cache), CacheReader(cache / "validation")


def copy_example(sample: dict, generator: torch.Generator) -> dict:
    """A random crop of the sample's first reference (upside down half the time) as both reference and target,
    with the prompt or, a third of the time, the negative prompt."""
    source = sample["ref.0"]
    h, w = source.shape[-2:]
    crop_h = 2 * int(torch.randint(2, h // 2 + 1, (1,), generator=generator))
    crop_w = 2 * int(torch.randint(2, w // 2 + 1, (1,), generator=generator))
    top = int(torch.randint(h - crop_h + 1, (1,), generator=generator))
    left = int(torch.randint(w - crop_w + 1, (1,), generator=generator))
    crop = source[..., top:top + crop_h, left:left + crop_w]
    if torch.rand(1, generator=generator) < 0.5:
        crop = crop.flip(-2)
    example = {k: v for k, v in sample.items() if k.startswith("ref.") or k == "prompt_emb"}
    if "negative_prompt_emb" in sample and torch.rand(1, generator=generator) < 1 / 3:
        example["prompt_emb"] = sample["negative_prompt_emb"]
    return {**example, "ref.0": crop.contiguous(), "target": crop.contiguous()}


def fit(family: str, samples: list[dict], steps: int, lr: float) -> tuple[torch.nn.Module, float]:
    """AdamW on the family's flow-matching loss, cosine-decayed lr after a short warm-up; the versions' switches
    (Qwen: 2511's zero_cond_t on, 2509's off) alternate."""
    from importlib import import_module

    from edittuner.configs import FlowMatchConfig
    from edittuner.families import model_spec
    from edittuner.objectives import FlowMatching

    module, versions, _ = FAMILIES[family]
    dit = import_module(module).random_tiny_dit(SEED).train()
    specs = [model_spec(version) for version in versions]
    objectives = [FlowMatching(FlowMatchConfig(), spec) for spec in specs]
    denoiser = specs[0].family.denoiser(dit)
    optimizer = torch.optim.AdamW(dit.parameters(), lr=lr, weight_decay=0.0)
    generator = torch.Generator().manual_seed(SEED)
    start = time.perf_counter()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr * min(1.0, (step + 1) / 100) * 0.5 * (1 + math.cos(math.pi * step / steps))
        example = copy_example(samples[int(torch.randint(len(samples), (1,), generator=generator))], generator)
        loss = objectives[step % len(objectives)].losses(denoiser, [example], [SEED * 1_000_003 + step], "cpu", torch.float32)
        optimizer.zero_grad(set_to_none=True)
        loss.mean().backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        optimizer.step()
        if step % 100 == 0 or step == steps - 1:
            print(f"  step {step:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.1f}s", flush=True)
    return dit.eval(), time.perf_counter() - start


@torch.no_grad()
def measure(family: str, dit: torch.nn.Module, pairs: list[tuple[dict, dict]]) -> dict:
    """Over held-out pairs: the mean squared distance of an 8-step, guidance-1 sample from the reference latents,
    and the PSNR of its decode against the reference's own pixels (what a preview shows at step 0)."""
    from edittuner.cache import record_pixels
    from edittuner.configs import SamplerConfig
    from edittuner.families import model_spec
    from edittuner.images import ResizeConfig
    from edittuner.metrics import edit_metrics
    from edittuner.models import ModelSource
    from edittuner.sampling import sample_edit_latents

    spec = model_spec(FAMILIES[family][1][0])
    vae = ModelSource(family=spec.family.name).load_vae(torch.float32)
    distances, psnrs = [], []
    for sample, record in pairs:
        latents = sample_edit_latents(dit, sample, SamplerConfig(steps=8, guidance=1.0, seed=0), spec, "cpu",
                                      torch.float32)
        distances.append(float((latents - sample["ref.0"][None]).pow(2).mean()))
        refs = record_pixels(record, ResizeConfig(max_pixels=96 * 96))[1]
        psnrs.append(edit_metrics(spec.family.decode(vae, latents), refs[0], None)["psnr"])
    return {"latent_mse": round(sum(distances) / len(distances), 4), "psnr_db": round(sum(psnrs) / len(psnrs), 2)}


def fit_family(family: str, folder: Path, steps: int | None, lr: float, check: bool) -> None:
    from importlib import import_module

    from safetensors.torch import save_file

    tiny = import_module(FAMILIES[family][0])
    train, held_out = demo_caches(folder, family)
    pairs = [(held_out.load(i), held_out.records[i]) for i in range(len(held_out))]
    random_init = measure(family, tiny.random_tiny_dit(SEED), pairs)
    if check:
        print(f"{family}: held-out copy: committed {measure(family, tiny.build_tiny_dit(SEED), pairs)}; "
              f"random init {random_init}")
        return
    steps = steps or FIT_STEPS[family]
    samples = [train.load(i) for i in range(len(train))]
    print(f"{family}: fitting {steps} steps on {len(samples)} demo sources")
    dit, seconds = fit(family, samples, steps, lr)
    fitted = measure(family, dit, pairs)
    print(f"{family}: held-out copy: fitted {fitted}; random init {random_init}; {seconds:.0f} s")
    settings = {"seed": SEED, "steps": steps, "lr": lr, "seconds": round(seconds),
                **{f"held_out_{k}": v for k, v in fitted.items()}}
    with atomic_path(tiny.TINY_DIT_WEIGHTS) as tmp:
        save_file({k: v.contiguous() for k, v in dit.state_dict().items()}, str(tmp),
                  metadata={"fit": json.dumps(settings)})
    print(f"wrote {tiny.TINY_DIT_WEIGHTS}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--family", choices=[*FAMILIES, "all"], default="all")
    parser.add_argument("--steps", type=int, default=None, help=f"fit steps (default: the committed fits' {FIT_STEPS})")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--check", action="store_true", help="measure the committed weights; write nothing")
    args = parser.parse_args()
    torch.set_num_threads(1)   # the same reductions on every machine size
    with tempfile.TemporaryDirectory() as tmp:
        for family in FAMILIES if args.family == "all" else [args.family]:
            fit_family(family, Path(tmp), args.steps, args.lr, args.check)


if __name__ == "__main__":
    main()
