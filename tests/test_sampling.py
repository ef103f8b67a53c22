import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from edittuner.cache import make_encoding_pipe
from edittuner.errors import EditTunerError
from edittuner.lora import PRESETS, inject_lora, set_lora_state
from edittuner.sampling import SampleConfig, edit_latents, fuse_lora
from edittuner.tiny import build_tiny_dit, build_tiny_encoders

from conftest import TINY_PIXELS, run_cli


def _cfg(demo_dir, resize, **kw):
    return SampleConfig(references=(demo_dir / "raw/source/03_rocket.png",), prompt="Blur the marked region.",
                        output=demo_dir / "unused.png", resize=resize, **kw)


def test_fused_lora_sampling_equals_the_adapter_path(demo_dir, resize, trained_run):
    """1-step bridge with the LoRA fused by the engine's loader == the same LoRA applied as peft adapters."""
    out, _, cfg = trained_run
    lora = load_file(out / "lora.safetensors")
    pipe = make_encoding_pipe(build_tiny_encoders(0), "cpu", torch.float32)
    fused = build_tiny_dit(0).eval()
    fuse_lora(fused, out / "lora.safetensors", 1.0)
    adapters = build_tiny_dit(0).eval()
    inject_lora(adapters, PRESETS["2511"].lora_targets, cfg.rank, cfg.alpha)
    set_lora_state(adapters, lora, cfg.rank, cfg.alpha)
    base = build_tiny_dit(0).eval()
    sample_cfg = _cfg(demo_dir, resize, steps=1)
    a, b, c = (edit_latents(sample_cfg, dit, pipe) for dit in (fused, adapters, base))
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a, c, atol=1e-3)
    # 2 steps with the stochastic term: seeded, so repeatable
    two = _cfg(demo_dir, resize, steps=2, bridge_sigma=0.3, seed=5)
    torch.testing.assert_close(edit_latents(two, fused, pipe), edit_latents(two, fused, pipe))


def test_sample_cli_writes_the_edited_image(demo_dir, trained_run, tmp_path):
    out, _, _ = trained_run
    target = tmp_path / "edit.png"
    for stream in ("main", "sub"):
        result = run_cli("sample", "--image", demo_dir / "raw/source/01_chelsea.png", "--prompt", "Invert it",
                         "--output", target, "--lora", out / "lora.safetensors", "--max_pixels", TINY_PIXELS,
                         "--steps", "2", "--stream", stream)
        assert result.returncode == 0, result.stderr[-2000:]
        assert Image.open(target).size == Image.open(demo_dir / "raw/source/01_chelsea.png").size


def test_sample_bad_inputs(demo_dir, resize, tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"blocks.0.q.lora_A.weight": torch.zeros(4, 8), "blocks.0.q.lora_B.weight": torch.zeros(8, 4)}, str(foreign))
    with pytest.raises(EditTunerError, match="do not exist in this base model"):
        fuse_lora(build_tiny_dit(0), foreign, 1.0)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"img_in.lora_A.weight": torch.zeros(4, 64), "img_in.lora_B.weight": torch.zeros(3072, 4)}, str(wrong))
    with pytest.raises(EditTunerError, match="does not fit"):
        fuse_lora(build_tiny_dit(0), wrong, 1.0)
    with pytest.raises(EditTunerError, match="--steps"):
        _cfg(demo_dir, resize, steps=0)
    result = run_cli("sample", "--image", tmp_path / "missing.png", "--prompt", "p", "--output", tmp_path / "o.png")
    assert result.returncode == 2 and "missing.png" in result.stderr and "Traceback" not in result.stderr
