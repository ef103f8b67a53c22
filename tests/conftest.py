import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# --report_to auto picks wandb when these are set; tests that want WandB set WANDB_MODE=offline themselves.
for _var in ("WANDB_MODE", "WANDB_API_KEY"):
    os.environ.pop(_var, None)
torch.set_num_threads(1)

TINY_PIXELS = 96 * 96


@pytest.fixture(scope="session")
def demo_dir(tmp_path_factory):
    from edittuner.demo import make_demo_dataset
    out = tmp_path_factory.mktemp("demo")
    make_demo_dataset(out, size=96)
    return out


@pytest.fixture(scope="session")
def resize():
    from edittuner.images import ResizeConfig
    return ResizeConfig(max_pixels=TINY_PIXELS)


def encode_demo(dataset_json, cache, resize, family: str | None = None, **settings):
    """Phase 1 of demo rows into ``cache`` by the tiny model (Qwen's unless ``family``); returns ``cache``."""
    from edittuner.cache import PrecomputeConfig, precompute_cache
    from edittuner.models import ModelSource
    model = ModelSource(family=family) if family else ModelSource()
    precompute_cache(PrecomputeConfig(dataset_json=dataset_json, cache_dir=cache, model=model, resize=resize,
                                      **settings), progress=False)
    return cache


@pytest.fixture(scope="session")
def demo_cache(demo_dir, resize, tmp_path_factory):
    return encode_demo(demo_dir / "dataset.json", tmp_path_factory.mktemp("cache"), resize)


@pytest.fixture(scope="session")
def longcat_cache(demo_dir, resize, tmp_path_factory):
    """The demo's single-reference pairs (and their validation pairs) encoded by the tiny LongCat-Image-Edit."""
    return encode_demo(demo_dir / "dataset_single_ref.json", tmp_path_factory.mktemp("cache_longcat"), resize,
                       "longcat-image-edit", model_version="longcat",
                       validation_json=demo_dir / "dataset_single_ref_val.json")


@pytest.fixture(scope="session")
def trained_run(demo_cache, resize, tmp_path_factory):
    """A short 2511 run on the demo cache, shared by the tests that inspect a finished run."""
    from edittuner.trainer import TrainConfig, train
    out = tmp_path_factory.mktemp("run")
    cfg = TrainConfig(cache_dir=demo_cache, output_dir=out, resize=resize, max_steps=40, learning_rate=5e-3,
                      rank=8, gradient_accumulation=2, save_every=20, gradient_checkpointing=False)
    result = train(cfg, progress=False)
    return out, result, cfg


def absolute_rows(demo_dir, name: str = "dataset.json", ids=None) -> list[dict]:
    """The rows of a demo dataset JSON (those in ``ids``, if given) with absolute paths, so that a JSON anywhere
    can hold them; a row without a mask (a demo photo with no red) keeps none."""
    import json
    rows = []
    for row in json.loads((demo_dir / name).read_text()):
        if ids is None or row["id"] in ids:
            row = dict(row, image=str(demo_dir / row["image"]), edit_image=[str(demo_dir / e) for e in row["edit_image"]])
            if row.get("back_mask"):
                row["back_mask"] = str(demo_dir / row["back_mask"])
            rows.append(row)
    return rows


def tiny_dit_with_lora(dit=None, dit_seed: int = 0):
    """The tiny DiT (or ``dit``) with a seeded rank-4 LoRA whose B is non-zero too, so that LoRA gradients depend
    on everything upstream."""
    from edittuner.families import PRESETS
    from edittuner.lora import inject_lora
    from edittuner.families.qwen_image_edit.tiny import build_tiny_dit
    dit = dit if dit is not None else build_tiny_dit(dit_seed)
    torch.manual_seed(0)
    inject_lora(dit, PRESETS["2511"].lora_targets, rank=4, alpha=4)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1)
    return dit


def run_cli(*args, env=None, cwd=ROOT):
    import subprocess
    full_env = {**os.environ, **(env or {})}
    return subprocess.run([sys.executable, "-m", "edittuner", *map(str, args)], capture_output=True, text=True,
                          env=full_env, cwd=cwd)


def fuse_lora(dit, path, strength: float = 1.0) -> None:
    """The engine's own fusion, W += strength * B @ A (what diffsynth's ``pipe.load_lora`` does): the independent
    reference our LoRA hooks and file layouts are checked against. Refuses a LoRA that does not fit, as the hooks do."""
    from diffsynth.utils.lora.general import GeneralLoRALoader

    from edittuner.lora import load_lora_file
    from edittuner.sampling import check_lora_fits
    state = load_lora_file(path)
    check_lora_fits(dit, state, path)
    loader = GeneralLoRALoader(device=dit.proj_out.weight.device, torch_dtype=dit.proj_out.weight.dtype)
    loader.fuse_lora_to_base_model(dit, state, alpha=strength)
