import json

import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file

from edittuner.errors import EditTunerError
from edittuner.families import PRESETS
from edittuner.lora import inject_lora, lora_module_names
from edittuner.families.qwen_image_edit.denoiser import collate_conditioning
from edittuner.objectives import flow_matching_losses
from edittuner.families.qwen_image_edit.denoiser import DiTDenoiser, training_scheduler
from edittuner.families.qwen_image_edit.tiny import build_tiny_dit, build_tiny_encoders
from edittuner.tracking import read_metrics
from edittuner.batching import sample_at
from edittuner.trainer import TrainConfig, train


def test_preset_targets():
    dit = build_tiny_dit(0)
    last = len(dit.transformer_blocks) - 1
    names_2511 = lora_module_names(dit, PRESETS["2511"].lora_targets)
    names_2509 = lora_module_names(dit, PRESETS["2509"].lora_targets)
    assert {"img_in", "txt_in", "proj_out"} <= set(names_2511)
    assert not {"img_in", "txt_in", "proj_out"} & set(names_2509)
    assert "transformer_blocks.0.attn.to_add_out" in names_2509 and "transformer_blocks.0.txt_mlp.net.2" in names_2509
    for names in (names_2509, names_2511):
        assert f"transformer_blocks.{last}.attn.add_q_proj" not in names
        assert f"transformer_blocks.{last}.attn.add_k_proj" in names
        assert f"transformer_blocks.{last}.attn.to_add_out" not in names
        assert f"transformer_blocks.{last}.txt_mlp.net.2" not in names
    assert PRESETS["2511"].zero_cond_t and not PRESETS["2509"].zero_cond_t
    assert PRESETS["2511"].gradient_accumulation == 16
    with pytest.raises(EditTunerError, match="match no Linear"):
        lora_module_names(dit, ("to_qq",))


@pytest.mark.parametrize("preset", ["2509", "2511"])
def test_every_lora_parameter_gets_a_gradient(demo_cache, preset):
    """Nothing in the target list is a dead end: each adapter gets a non-zero gradient (so DDP needs no
    find_unused_parameters). lora_B starts at zero, which would zero lora_A's gradient, so B is randomised first."""
    dit = build_tiny_dit(0)
    inject_lora(dit, PRESETS[preset].lora_targets, rank=4, alpha=4)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1)
    sample = load_file(next((demo_cache / "samples").glob("*.safetensors")))
    loss = flow_matching_losses(DiTDenoiser(dit), training_scheduler(), [sample["target"][None]], [0],
                                collate_conditioning([sample], "cpu", torch.float32, PRESETS[preset].zero_cond_t))[0]
    loss.backward()
    lora = {n: p for n, p in dit.named_parameters() if ".lora_" in n}
    assert lora and all(p.grad is not None and p.grad.abs().sum() > 0 for p in lora.values()), \
        [n for n, p in lora.items() if p.grad is None or p.grad.abs().sum() == 0]
    assert all(not p.requires_grad for n, p in dit.named_parameters() if ".lora_" not in n)


def test_run_directory_and_loss_falls(trained_run):
    out, result, cfg = trained_run
    config = json.loads((out / "config.json").read_text())
    assert config["model_version"] == "2511" and config["zero_cond_t"] is True and config["rank"] == 8
    assert config["resolved"]["mixed_precision"] == "no"
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics] == list(range(1, 41))
    assert all({"step", "loss", "lr", "step_time_s"} <= m.keys() for m in metrics)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-20", "step-40"]
    # The fixed-noise loss on the 8-sample overfit set falls clearly.
    assert result["eval_loss_end"] < 0.8 * result["eval_loss_start"], result
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval_loss_end"] == result["eval_loss_end"]


def test_lora_file_format(trained_run):
    out, _, cfg = trained_run
    state = load_file(out / "lora.safetensors")
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in state)
    # diffusion_model.<module>: the prefix both diffsynth's and diffusers' loaders accept (test_lora_formats.py)
    assert all(k.startswith("diffusion_model.") for k in state)
    assert "diffusion_model.img_in.lora_A.weight" in state and "diffusion_model.proj_out.lora_B.weight" in state
    with safe_open(str(out / "lora.safetensors"), "pt") as f:
        meta = f.metadata()
    assert meta["rank"] == "8" and meta["base_model"] == "Qwen-Image-Edit-2511"
    assert float(meta["alpha"]) == cfg.alpha and meta["alpha_folded_into_lora_B"] == "true"
    assert "img_in" in json.loads(meta["target_modules"])
    # the final LoRA is the last checkpoint's
    last = load_file(out / "checkpoints/step-40/lora.safetensors")
    assert all(torch.equal(state[k], last[k]) for k in state)


def test_lora_loads_into_diffsynth_pipeline_and_changes_output(trained_run):
    from diffsynth.pipelines.qwen_image import QwenImagePipeline
    out, _, _ = trained_run
    encoders = build_tiny_encoders(0)
    pipe = QwenImagePipeline(device="cpu", torch_dtype=torch.float32)
    pipe.dit, pipe.vae, pipe.text_encoder, pipe.processor = build_tiny_dit(0), encoders.vae, encoders.text_encoder, encoders.processor
    base_weight = pipe.dit.img_in.weight.detach().clone()
    source = Image.new("RGB", (64, 64), (120, 40, 200))
    run = lambda: pipe("Blur the marked region.", edit_image=[source], edit_image_auto_resize=False, height=64,  # noqa: E731
                       width=64, num_inference_steps=3, seed=0, cfg_scale=1.0, zero_cond_t=True,
                       progress_bar_cmd=lambda x: x)
    before = run()
    pipe.load_lora(pipe.dit, str(out / "lora.safetensors"))
    after = run()
    lora = load_file(out / "lora.safetensors")
    torch.testing.assert_close(pipe.dit.img_in.weight, base_weight + lora["diffusion_model.img_in.lora_B.weight"]
                               @ lora["diffusion_model.img_in.lora_A.weight"])
    diff = (torch.tensor(list(before.getdata()), dtype=torch.float) - torch.tensor(list(after.getdata()), dtype=torch.float)).abs()
    assert diff.mean() > 0.5, diff.mean()


def test_resume_continues_the_run_exactly(demo_cache, resize, tmp_path, trained_run):
    """Training 20 steps, then resuming from step-20 to 40, gives the uninterrupted run's metrics and LoRA."""
    out, _, cfg = trained_run
    first = TrainConfig(**{**cfg.__dict__, "output_dir": tmp_path, "max_steps": 20})
    train(first, progress=False)
    second = TrainConfig(**{**cfg.__dict__, "output_dir": tmp_path, "max_steps": 40, "resume": "latest"})
    train(second, progress=False)
    full, resumed = read_metrics(out / "metrics.jsonl"), read_metrics(tmp_path / "metrics.jsonl")
    assert [m["loss"] for m in resumed] == [m["loss"] for m in full]
    a, b = load_file(out / "lora.safetensors"), load_file(tmp_path / "lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_data_order_is_a_permutation_per_epoch():
    order = [sample_at(p, 8, seed=3) for p in range(16)]
    assert sorted(order[:8]) == list(range(8)) and sorted(order[8:]) == list(range(8)) and order[:8] != order[8:]


@pytest.mark.parametrize("field, value, message", [
    ("max_steps", 0, "--max_steps"), ("learning_rate", -1.0, "--learning_rate"), ("rank", 0, "--rank"),
    ("model_version", "2600", "--model_version"), ("gradient_accumulation", -2, "--gradient_accumulation"),
    ("mixed_precision", "fp8", "--mixed_precision"),
])
def test_out_of_range_training_flags(tmp_path, field, value, message):
    with pytest.raises(EditTunerError, match=message):
        TrainConfig(cache_dir=tmp_path, output_dir=tmp_path, **{field: value})


@pytest.mark.parametrize("version, wider", [("2511", ("to_q", "img_mlp.net.0.proj", "txt_mlp.net.0.proj")),
                                             ("longcat", ("to_q", "ff.net.0.proj", "proj_mlp"))])
def test_lora_targets_are_checked_on_the_meta_skeleton_before_any_load(tmp_path, version, wider):
    """`train --dry_run` (the launchers' check) refuses a target matching no Linear layer of the family's DiT,
    from its config alone, and takes a wider list that matches (the same layers as on the real DiT)."""
    from edittuner.configs import TrainConfig
    from edittuner.families import family_of
    from edittuner.models import ModelSource
    from edittuner.trainer import check_lora_targets

    def config(targets):
        return TrainConfig(cache_dir=tmp_path / "c", output_dir=tmp_path / "r", model_version=version,
                           lora_targets=targets, model=ModelSource(family=family_of(version).name))
    check_lora_targets(config(wider))
    skeleton = config(wider).spec.family.dit_skeleton(config(wider).model)
    assert all(p.is_meta for p in skeleton.parameters())
    with pytest.raises(EditTunerError, match=r"\['to_qq'\] match no Linear layer of the DiT; its layers inside"):
        check_lora_targets(config(("to_q", "to_qq")))
