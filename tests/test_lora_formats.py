"""LoRA files that other tools load: our file in diffusers and diffsynth, and export-lora's conversions."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from edittuner.errors import EditTunerError
from edittuner.families import PRESETS
from edittuner.lora import export_lora, inject_lora, load_lora_file, lora_parameters, lora_state_dict, save_lora
from edittuner.families.qwen_image_edit.denoiser import DiTDenoiser
from edittuner.families.qwen_image_edit.tiny import TINY_DIT, build_tiny_dit

from conftest import fuse_lora, run_cli

H, W, REF_H, REF_W, TEXT = 8, 12, 10, 8, 7  # latent sizes (pixels / 8) and prompt length of the parity inputs
PARITY_ATOL = 1e-4


def _pack(z):
    """(B, C, H, W) latents -> (B, H/2 * W/2, C*4) tokens, the 2x2 patching both engines use."""
    b, c, h, w = z.shape
    return z.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def _unpack(tokens, h, w):
    b = tokens.shape[0]
    return tokens.view(b, h // 2, w // 2, 16, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, 16, h, w)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(1, 16, H, W, generator=g), "reference": torch.randn(1, 16, REF_H, REF_W, generator=g),
            "prompt_emb": torch.randn(1, TEXT, TINY_DIT["joint_attention_dim"], generator=g),
            "timestep": torch.tensor([637.0])}


@torch.no_grad()
def _our_output(dit, inputs, with_reference):
    """Our path: diffsynth's DiT through the engine's model function (what training and sampling run)."""
    return DiTDenoiser(dit.eval())(inputs["latents"], inputs["timestep"], prompt_emb=inputs["prompt_emb"],
                                   prompt_emb_mask=torch.ones(1, TEXT, dtype=torch.long),
                                   edit_latents=[inputs["reference"]] if with_reference else None,
                                   height=H * 8, width=W * 8, zero_cond_t=True)


@torch.no_grad()
def _diffusers_output(transformer, inputs, with_reference):
    """The same step as QwenImageEditPlusPipeline calls its transformer: packed tokens, reference tokens appended,
    timestep / 1000, one img_shapes entry per image, the first image's tokens cut back out."""
    refs = [inputs["reference"]] if with_reference else []
    tokens = torch.cat([_pack(inputs["latents"])] + [_pack(r) for r in refs], dim=1)
    shapes = [[(1, H // 2, W // 2)] + [(1, r.shape[2] // 2, r.shape[3] // 2) for r in refs]]
    out = transformer.eval()(hidden_states=tokens, encoder_hidden_states=inputs["prompt_emb"],
                             encoder_hidden_states_mask=torch.ones(1, TEXT), timestep=inputs["timestep"] / 1000,
                             img_shapes=shapes, return_dict=False)[0]
    return _unpack(out[:, : H * W // 4], H, W)


def _diffusers_transformer():
    """diffusers' Qwen-Image transformer (2511: zero_cond_t) with the tiny model's base weights.

    One known difference between the engines is not about LoRA: diffusers' feed-forward uses the tanh GELU,
    diffsynth's Qwen-Image DiT x * sigmoid(1.702 x). That alone moves the tiny model's output by ~1e-3, so the
    activation is swapped for the engine's here; with it, the base models agree exactly."""
    from diffusers import QwenImageTransformer2DModel
    from diffusers.models.activations import GELU

    transformer = QwenImageTransformer2DModel(**TINY_DIT, zero_cond_t=True)
    transformer.load_state_dict(build_tiny_dit(0).state_dict())
    for module in transformer.modules():
        if isinstance(module, GELU):
            module.gelu = lambda x: x * torch.sigmoid(1.702 * x)
    return transformer


def _diffusers_pipeline():
    """A real QwenImageEditPlusPipeline around the transformer: load_lora_weights needs no other component."""
    from diffusers import QwenImageEditPlusPipeline
    return QwenImageEditPlusPipeline(scheduler=None, vae=None, text_encoder=None, tokenizer=None, processor=None,
                                     transformer=_diffusers_transformer())


def _deltas(path):
    """{module: effective delta} from a file's raw tensors, written out here independently of edittuner.lora:
    alpha / rank * B @ A where a layer has an alpha, else B @ A; prefixes diffusion_model. / transformer. dropped."""
    state = load_file(str(path))
    deltas = {}
    for key, b in state.items():
        if not key.endswith(".lora_B.weight"):
            continue
        name = key.removesuffix(".lora_B.weight")
        a = state[name + ".lora_A.weight"]
        scale = float(state[name + ".alpha"]) / a.shape[0] if name + ".alpha" in state else 1.0
        deltas[name.removeprefix("diffusion_model.").removeprefix("transformer.")] = scale * b @ a
    return deltas


def _metadata(path):
    with safe_open(str(path), "pt") as f:
        return f.metadata()


@pytest.fixture(scope="module")
def exports(trained_run, tmp_path_factory):
    """The trained LoRA (ours, diffsynth format) and its comfyui and diffusers exports."""
    out, _, _ = trained_run
    folder = tmp_path_factory.mktemp("exports")
    files = {"diffsynth": out / "lora.safetensors"}
    for fmt in ("comfyui", "diffusers"):
        files[fmt] = folder / f"{fmt}.safetensors"
        assert export_lora(files["diffsynth"], files[fmt], fmt) == "diffsynth"
    return files


@pytest.mark.parametrize("fmt", ["diffsynth", "comfyui", "diffusers"])
def test_diffusers_load_lora_weights_matches_our_fused_lora(exports, fmt):
    """THE interchange check: the trained LoRA file, loaded by diffusers' QwenImageEditPlusPipeline.load_lora_weights
    (its Qwen-Image key conversion, then peft adapters on QwenImageTransformer2DModel), gives the output of our own
    path (diffsynth DiT, LoRA fused by fuse_lora, forwarded by the engine's model function), with and without a
    reference latent. Our own file is loaded unconverted; the exports must load the same."""
    ours = build_tiny_dit(0)
    fuse_lora(ours, exports["diffsynth"], 1.0)
    base = build_tiny_dit(0)
    pipe = _diffusers_pipeline()
    pipe.load_lora_weights(str(exports[fmt]))
    adapters = [n for n, _ in pipe.transformer.named_modules() if n.endswith("lora_A")]
    assert len(adapters) == len(load_lora_file(exports["diffsynth"])) // 2  # every layer of the file, none dropped
    inputs = _inputs()
    for with_reference in (False, True):
        expected = _our_output(ours, inputs, with_reference)
        got = _diffusers_output(pipe.transformer, inputs, with_reference)
        difference = (got - expected).abs().max().item()
        assert difference < PARITY_ATOL, (fmt, with_reference, difference)
        # ... and the LoRA does change the output, far beyond that tolerance
        assert (expected - _our_output(base, inputs, with_reference)).abs().max() > 1000 * PARITY_ATOL


def test_the_tolerance_would_catch_a_wrong_scale(exports):
    """The parity check has teeth: the LoRA at strength 0.9 is outside its tolerance."""
    ours = build_tiny_dit(0)
    fuse_lora(ours, exports["diffsynth"], 0.9)
    pipe = _diffusers_pipeline()
    pipe.load_lora_weights(str(exports["diffsynth"]))
    inputs = _inputs(1)
    assert (_diffusers_output(pipe.transformer, inputs, True) - _our_output(ours, inputs, True)).abs().max() > PARITY_ATOL


@pytest.mark.filterwarnings("ignore:Alpha detected")  # diffsynth's note on files with .alpha tensors
@pytest.mark.parametrize("fmt", ["diffsynth", "comfyui"])
def test_diffsynth_loaders_give_the_fuse_lora_weights(exports, fmt):
    """diffsynth's pipe.load_lora (GeneralLoRALoader) reads our file, and the ComfyUI export with its alphas,
    to the weights fuse_lora makes: W + B @ A."""
    from diffsynth.pipelines.qwen_image import QwenImagePipeline
    from diffsynth.utils.lora.general import GeneralLoRALoader

    ours = build_tiny_dit(0)
    fuse_lora(ours, exports["diffsynth"], 1.0)
    pipe = QwenImagePipeline(device="cpu", torch_dtype=torch.float32)
    pipe.dit = build_tiny_dit(0)
    pipe.load_lora(pipe.dit, str(exports[fmt]))
    loader_only = build_tiny_dit(0)
    GeneralLoRALoader().fuse_lora_to_base_model(loader_only, load_file(str(exports[fmt])))
    expected, base = ours.state_dict(), build_tiny_dit(0).state_dict()
    deltas = _deltas(exports["diffsynth"])
    for name, delta in deltas.items():
        torch.testing.assert_close(expected[name + ".weight"], base[name + ".weight"] + delta, atol=1e-6, rtol=1e-5)
    for model in (pipe.dit, loader_only):
        for key, value in model.state_dict().items():
            torch.testing.assert_close(value, expected[key], atol=1e-6, rtol=1e-5)
    assert sum(not torch.equal(expected[k], base[k]) for k in base) == len(deltas)


def _lora_with_alpha(tmp_path, rank=4, alpha=16.0):
    """A LoRA with alpha != rank (scale 4 folded into lora_B) and its unfolded lora_B, as trained."""
    dit = build_tiny_dit(0)
    inject_lora(dit, PRESETS["2511"].lora_targets, rank, alpha)
    torch.manual_seed(0)
    for name, param in lora_parameters(dit):
        param.data = torch.randn_like(param) * 0.05
    raw_b = {name.replace(".default.weight", ".weight"): p.detach().clone()
             for name, p in lora_parameters(dit) if ".lora_B." in name}
    path = tmp_path / "alpha.safetensors"
    save_lora(path, lora_state_dict(dit, rank, alpha),
              {"format": "diffsynth", "base_model": "Qwen-Image-Edit-2511", "rank": str(rank), "alpha": str(alpha),
               "alpha_folded_into_lora_B": "true", "target_modules": list(PRESETS["2511"].lora_targets),
               "zero_cond_t": "true"})
    return path, raw_b


def test_export_round_trip_keeps_every_delta(tmp_path):
    """diffsynth -> comfyui -> diffusers -> diffsynth: the same effective delta per layer; the ComfyUI file stores
    the training alpha per layer next to the unfolded (as trained) lora_B; metadata travels."""
    native, raw_b = _lora_with_alpha(tmp_path)
    comfy, diffusers_file, back = (tmp_path / f"{n}.safetensors" for n in ("comfy", "diffusers", "back"))
    assert export_lora(native, comfy, "comfyui") == "diffsynth"
    assert export_lora(comfy, diffusers_file, "diffusers") == "comfyui"
    assert export_lora(diffusers_file, back, "diffsynth") == "diffusers"

    comfy_state = load_file(str(comfy))
    assert all(k.startswith("diffusion_model.") for k in comfy_state)
    layers = [k.removesuffix(".lora_A.weight") for k in comfy_state if k.endswith(".lora_A.weight")]
    assert {k for k in comfy_state if k.endswith(".alpha")} == {name + ".alpha" for name in layers}
    assert all(comfy_state[name + ".alpha"].ndim == 0 and float(comfy_state[name + ".alpha"]) == 16.0 for name in layers)
    for key, b in raw_b.items():
        torch.testing.assert_close(comfy_state["diffusion_model." + key], b)  # B * rank / alpha undoes the fold
    assert all(k.startswith("transformer.") for k in load_file(str(diffusers_file)))
    assert load_file(str(back)).keys() == load_file(str(native)).keys()

    reference = _deltas(native)
    for path in (comfy, diffusers_file, back):
        deltas = _deltas(path)
        assert deltas.keys() == reference.keys()
        for name, delta in reference.items():
            torch.testing.assert_close(deltas[name], delta, atol=1e-6, rtol=1e-5)
    for path, fmt, folded in ((comfy, "comfyui", "false"), (diffusers_file, "diffusers", "true"), (back, "diffsynth", "true")):
        meta = _metadata(path)
        assert (meta["format"], meta["rank"], float(meta["alpha"]), meta["alpha_folded_into_lora_B"]) == (fmt, "4", 16.0, folded)
        assert meta["base_model"] == "Qwen-Image-Edit-2511" and "img_in" in json.loads(meta["target_modules"])


def test_alpha_exports_load_in_diffusers_and_old_files_still_read(tmp_path):
    """diffusers applies the ComfyUI alphas to the same weights as our fuse_lora; files in the old bare layout
    and diffusers' own save_lora_weights output (peft lora_alpha in its metadata) read to the same deltas."""
    from diffusers import QwenImageEditPlusPipeline

    native, _ = _lora_with_alpha(tmp_path)
    comfy = tmp_path / "comfy.safetensors"
    export_lora(native, comfy, "comfyui")
    ours = build_tiny_dit(0)
    fuse_lora(ours, comfy, 1.0)
    pipe = _diffusers_pipeline()
    pipe.load_lora_weights(str(comfy))
    pipe.fuse_lora()
    pipe.unload_lora_weights()  # diffusers' fuse-then-unload: plain weights with the LoRA in them
    theirs = pipe.transformer.state_dict()
    for key, value in ours.state_dict().items():
        torch.testing.assert_close(theirs[key], value, atol=1e-6, rtol=1e-5)

    reference = load_lora_file(native)
    old = tmp_path / "old.safetensors"
    save_file({k.removeprefix("diffusion_model."): v for k, v in load_file(str(native)).items()}, str(old))
    # diffusers' writer with peft's lora_alpha = 2 r: it keeps the scale out of the tensors, in its metadata
    QwenImageEditPlusPipeline.save_lora_weights(
        tmp_path / "peft", transformer_lora_layers={k: v / 2 if ".lora_B." in k else v for k, v in reference.items()},
        transformer_lora_adapter_metadata={"r": 4, "lora_alpha": 8, "target_modules": ["img_in"]})
    for path in (old, tmp_path / "peft/pytorch_lora_weights.safetensors"):
        state = load_lora_file(path)
        assert state.keys() == reference.keys()
        for key, value in reference.items():
            torch.testing.assert_close(state[key], value, atol=1e-6, rtol=1e-5)


def test_bad_inputs_get_clear_errors(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"this is not a safetensors file")
    with pytest.raises(EditTunerError, match="not a readable LoRA safetensors file"):
        export_lora(garbage, tmp_path / "out.safetensors", "comfyui")
    weights = tmp_path / "weights.safetensors"
    save_file({"img_in.weight": torch.zeros(4, 4)}, str(weights))
    with pytest.raises(EditTunerError, match="not a LoRA file"):
        export_lora(weights, tmp_path / "out.safetensors", "comfyui")
    half = tmp_path / "half.safetensors"
    save_file({"diffusion_model.img_in.lora_A.weight": torch.zeros(4, 64)}, str(half))
    with pytest.raises(EditTunerError, match="img_in lacks lora_B"):
        export_lora(half, tmp_path / "out.safetensors", "diffusers")
    with pytest.raises(EditTunerError, match="unknown LoRA format 'kohya'"):
        export_lora(half, tmp_path / "out.safetensors", "kohya")
    assert not (tmp_path / "out.safetensors").exists()


def test_export_lora_cli(trained_run, tmp_path):
    out, _, _ = trained_run
    result = run_cli("export-lora", "--input", out / "lora.safetensors", "--output", tmp_path / "c.safetensors",
                     "--format", "comfyui")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "(diffsynth)" in result.stdout and "(comfyui)" in result.stdout
    assert any(k.endswith(".alpha") for k in load_file(str(tmp_path / "c.safetensors")))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 16)
    result = run_cli("export-lora", "--input", garbage, "--output", tmp_path / "o.safetensors", "--format", "diffusers")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.strip().count("\n") == 0 and "not a readable LoRA safetensors file" in result.stderr
    assert not (tmp_path / "o.safetensors").exists()
