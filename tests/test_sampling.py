"""`edittuner sample`: the flow sampler against the engine's own pipeline, mask keeping, LoRA hooks, batch mode."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from edittuner.families.qwen_image_edit.encoding import make_encoding_pipe
from edittuner.images import fit_reference, mask_to_latent_grid
from edittuner.errors import EditTunerError
from edittuner.images import load_rgb
from edittuner.families import PRESETS
from edittuner.lora import inject_lora, set_lora_state
from edittuner.sampling import Editor, SamplerConfig
from edittuner.families.qwen_image_edit.tiny import build_tiny_dit, build_tiny_encoders

from conftest import TINY_PIXELS, fuse_lora, run_cli

PROMPT = "Blur the marked region."


@pytest.fixture(scope="module")
def editor(resize):
    return Editor(resize=resize)


@pytest.fixture(scope="module")
def source(demo_dir):
    return load_rgb(demo_dir / "raw/source/03_rocket.png")


def _box_mask(size, box=(16, 8, 48, 40)):
    """A rectangle on the 8-pixel latent grid, so that its latent mask is exactly 0/1."""
    mask = Image.new("L", size, 0)
    mask.paste(255, box)
    return mask


@pytest.mark.parametrize("masked", [False, True])
def test_flow_sampler_with_cfg_is_the_engines_pipeline(editor, source, masked):
    """Same seed, steps, guidance and negative prompt: our image equals diffsynth's QwenImagePipeline's, pixel for
    pixel, with and without an inpainting mask (the engine blends with the same rule)."""
    ref = fit_reference(source, editor.resize)
    mask = _box_mask(ref.size) if masked else None
    sampler = SamplerConfig(sampler="flow", steps=3, guidance=4.0, seed=7, keep_unmasked_pixels=False)
    ours = editor.edit([source], PROMPT, sampler, mask=mask)
    pipe = make_encoding_pipe(build_tiny_encoders(0), "cpu", torch.float32)
    pipe.dit = editor.dit
    extra = {}
    if masked:
        grid = mask_to_latent_grid(mask, ref.size)
        extra = {"input_image": ref, "inpaint_mask": Image.fromarray((grid[0].numpy() * 255).astype("uint8"))}
    engine = pipe(prompt=PROMPT, negative_prompt=" ", cfg_scale=4.0, edit_image=[ref], edit_image_auto_resize=False,
                  height=ref.size[1], width=ref.size[0], seed=7, num_inference_steps=3, zero_cond_t=True,
                  progress_bar_cmd=lambda x: x, **extra)
    assert np.array_equal(np.asarray(ours.image), np.asarray(engine))
    # CFG matters: guidance 1 (one forward per step) gives another image.
    plain = editor.edit([source], PROMPT, SamplerConfig(sampler="flow", steps=3, guidance=1.0, seed=7), mask=mask)
    assert not np.array_equal(np.asarray(plain.image), np.asarray(ours.image))


@pytest.mark.parametrize("sampler", [SamplerConfig(sampler="flow", steps=4, seed=1),
                                     SamplerConfig(sampler="bridge", steps=2, bridge_sigma=0.2, seed=1),
                                     SamplerConfig(sampler="bridge", steps=1, stream="sub")])
def test_mask_regenerates_only_the_masked_region(editor, source, sampler):
    ref = fit_reference(source, editor.resize)
    mask = _box_mask(ref.size)
    result = editor.edit([source], PROMPT, sampler, mask=mask)
    with torch.no_grad():
        known = editor.encoder.encode_image(ref)[None]
    outside = 1 - mask_to_latent_grid(mask, ref.size)[None]
    # The latents outside the mask are the source's; inside they are new.
    assert float(((result.latents - known) * outside).abs().max()) < 1e-5
    assert float(((result.latents - known) * (1 - outside)).abs().max()) > 1e-2
    # Pixels outside the mask are the source's exactly (pasted back); the VAE's round-off there is reported.
    out, src = np.asarray(result.image).astype(int), np.asarray(ref).astype(int)
    keep = np.asarray(mask) == 0
    assert np.array_equal(out[keep], src[keep]) and not np.array_equal(out[~keep], src[~keep])
    assert result.vae_roundoff_outside_mask > 0
    # Without the paste, pixels away from the mask are the VAE round trip of the source, up to the few levels
    # the decoder's mid-block attention (global reach) carries over from the new content: under 5% of the change
    # inside the mask (the fitted tiny VAE: at most 2%, 7 levels at the most).
    raw = editor.edit([source], PROMPT, SamplerConfig(**{**sampler.__dict__, "keep_unmasked_pixels": False}), mask=mask)
    round_trip = np.asarray(editor.decode(known)).astype(int)
    far = np.zeros_like(keep)
    far[:, 72:] = True  # 24+ px right of the mask
    diff = np.abs(np.asarray(raw.image).astype(int) - round_trip)
    assert diff[far].mean() < 0.05 * diff[~keep].mean() and diff[far].max() <= 8


def test_lora_hooks_match_fused_and_training_adapters_and_removal_restores_the_base(editor, source, trained_run):
    out, _, cfg = trained_run
    path = out / "lora.safetensors"
    sampler = SamplerConfig(sampler="bridge", steps=1)
    base_weights = {k: v.clone() for k, v in editor.dit.state_dict().items()}
    base = editor.edit([source], PROMPT, sampler).latents
    editor.set_lora(path, 1.0)
    hooked = editor.edit([source], PROMPT, sampler).latents
    editor.set_lora(path, 0.5)
    half = editor.edit([source], PROMPT, sampler).latents
    editor.set_lora(None)
    restored = editor.edit([source], PROMPT, sampler).latents
    assert all(torch.equal(v, base_weights[k]) for k, v in editor.dit.state_dict().items())
    assert torch.equal(restored, base)
    assert not torch.allclose(hooked, base, atol=1e-3) and not torch.allclose(half, hooked, atol=1e-3)

    encoded_dit = {}
    fused = build_tiny_dit(0).eval()
    fuse_lora(fused, path, 1.0)
    adapters = build_tiny_dit(0).eval()
    inject_lora(adapters, PRESETS["2511"].lora_targets, cfg.rank, cfg.alpha)
    set_lora_state(adapters, load_file(path), cfg.rank, cfg.alpha)
    for name, dit in (("fused", fused), ("adapters", adapters)):
        encoded_dit[name] = editor.sample_latents(_encode(editor, source), sampler, dit=dit)
    torch.testing.assert_close(encoded_dit["fused"], hooked, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encoded_dit["adapters"], hooked, atol=1e-5, rtol=1e-5)


def _encode(editor, source):
    from edittuner.families.qwen_image_edit.encoding import encode_images_and_prompt
    return encode_images_and_prompt(editor.encoder.pipe, editor.encoder.embedder, PROMPT, None, [fit_reference(source, editor.resize)],
                                    None)


def test_stochastic_bridge_is_seeded(editor, source):
    sampler = SamplerConfig(sampler="bridge", steps=2, bridge_sigma=0.3, seed=5)
    a, b = (editor.edit([source], PROMPT, sampler).latents for _ in range(2))
    c = editor.edit([source], PROMPT, SamplerConfig(sampler="bridge", steps=2, bridge_sigma=0.3, seed=6)).latents
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_sample_cli_single_masked_and_batch(demo_dir, trained_run, tmp_path):
    out, _, _ = trained_run
    target = tmp_path / "edit.png"
    source = demo_dir / "raw/source/01_chelsea.png"
    result = run_cli("sample", "--image", source, "--prompt", "Invert it", "--output", target, "--mask",
                     demo_dir / "raw/mask/01_chelsea.png", "--lora", out / "lora.safetensors", "--max_pixels",
                     TINY_PIXELS, "--steps", "2")
    assert result.returncode == 0, result.stderr[-2000:]
    assert "outside the mask the VAE round trip" in result.stdout
    assert Image.open(target).size == Image.open(source).size
    for stream in ("main", "sub"):
        result = run_cli("sample", "--image", source, "--prompt", "Invert it", "--output", target, "--sampler",
                         "bridge", "--stream", stream, "--max_pixels", TINY_PIXELS)
        assert result.returncode == 0, result.stderr[-2000:]
    rows = json.loads((demo_dir / "dataset.json").read_text())
    result = run_cli("sample", "--dataset_json", demo_dir / "dataset.json", "--output_dir", tmp_path / "batch",
                     "--use_dataset_masks", "--steps", "1", "--guidance", "1", "--max_pixels", TINY_PIXELS)
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.stem for p in (tmp_path / "batch").glob("*.png")) == sorted(r["id"] for r in rows)


def test_sample_bad_inputs(demo_dir, editor, source, tmp_path):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"blocks.0.q.lora_A.weight": torch.zeros(4, 8), "blocks.0.q.lora_B.weight": torch.zeros(8, 4)}, str(foreign))
    with pytest.raises(EditTunerError, match="do not exist in this base model"):
        editor.set_lora(foreign)
    wrong = tmp_path / "wrong.safetensors"
    save_file({"img_in.lora_A.weight": torch.zeros(4, 64), "img_in.lora_B.weight": torch.zeros(3072, 4)}, str(wrong))
    with pytest.raises(EditTunerError, match="does not fit"):
        fuse_lora(build_tiny_dit(0), wrong, 1.0)
    with pytest.raises(EditTunerError, match="no lora_A/lora_B"):
        editor.set_lora(_not_a_lora(tmp_path))
    assert not editor.lora.handles
    with pytest.raises(EditTunerError, match="--steps"):
        SamplerConfig(steps=0)
    with pytest.raises(EditTunerError, match="mask is empty"):
        editor.edit([source], PROMPT, SamplerConfig(steps=1), mask=Image.new("L", source.size, 0))
    result = run_cli("sample", "--image", tmp_path / "missing.png", "--prompt", "p", "--output", tmp_path / "o.png")
    assert result.returncode == 2 and "missing.png" in result.stderr and "Traceback" not in result.stderr
    result = run_cli("sample", "--prompt", "p", "--output", tmp_path / "o.png")
    assert result.returncode == 2 and "--image" in result.stderr and "Traceback" not in result.stderr


def _not_a_lora(tmp_path):
    path = tmp_path / "weights.safetensors"
    save_file({"img_in.weight": torch.zeros(4, 4)}, str(path))
    return path


def _relabelled(trained_run, path, **metadata):
    """The trained LoRA with its metadata changed as another run would have written it."""
    from edittuner.lora import read_lora_file, save_lora
    state, recorded = read_lora_file(trained_run[0] / "lora.safetensors")
    save_lora(path, state, {k: v for k, v in {**recorded, **metadata}.items() if v is not None})
    return path


def test_choose_model_from_lora_metadata_and_flags():
    from edittuner.sampling import choose_model
    assert choose_model(None, None) == choose_model({}, "x.safetensors") == ("2511", True, ())
    assert choose_model({"base_model": "Qwen-Image-Edit-2509", "zero_cond_t": "true"}, "x")[:2] == ("2509", True)
    assert choose_model({"base_model": "Qwen-Image-Edit-2511", "zero_cond_t": "false"}, "x")[:2] == ("2511", False)
    chosen = choose_model({"base_model": "Qwen-Image-Edit-2509", "zero_cond_t": "false"}, "x", "2511")
    assert chosen[:2] == ("2511", True) and len(chosen.notes) == 2   # the version's preset, both said
    assert "overrides the version x was trained for (Qwen-Image-Edit-2509)" in chosen.notes[0]
    chosen = choose_model({"base_model": "Qwen-Image-Edit-2511", "zero_cond_t": "true"}, "x", None, False)
    assert chosen[:2] == ("2511", False) and "--zero_cond_t off overrides the setting x was trained with (on)" \
        in chosen.notes[0]
    assert choose_model({"base_model": "FLUX.1"}, "x", None, False) == ("2511", False, ())  # other tools' files
    with pytest.raises(EditTunerError, match="base_model 'Qwen-Image-Edit-2612', a version this edittuner does not "
                                             "know .*pass --model_version"):
        choose_model({"base_model": "Qwen-Image-Edit-2612"}, "x")
    assert choose_model({"base_model": "Qwen-Image-Edit-2612"}, "x", "2509").version == "2509"
    with pytest.raises(EditTunerError, match="zero_cond_t 'maybe', neither true nor false; pass --zero_cond_t"):
        choose_model({"zero_cond_t": "maybe"}, "x")


def test_sample_takes_zero_cond_t_from_the_lora_and_warns_on_override(trained_run, demo_dir, tmp_path, monkeypatch,
                                                                      capsys):
    import edittuner.sampling as sampling
    from edittuner import cli
    seen = []
    original = sampling.sample_edit_latents

    def recording(dit, encoded, sampler, model, *args, **kwargs):
        seen.append(model.zero_cond_t)
        return original(dit, encoded, sampler, model, *args, **kwargs)

    monkeypatch.setattr(sampling, "sample_edit_latents", recording)

    def sample(lora, *flags):
        code = cli.main([str(a) for a in ("sample", "--image", demo_dir / "raw/source/01_chelsea.png", "--prompt",
                                          PROMPT, "--output", tmp_path / "out.png", "--steps", "1", "--guidance", "1",
                                          "--max_pixels", TINY_PIXELS, *(("--lora", lora) if lora else ()), *flags)])
        return code, capsys.readouterr().err

    off = _relabelled(trained_run, tmp_path / "off.safetensors", zero_cond_t="false")  # a 2511 run with it off
    assert sample(off) == (0, "") and seen == [False]
    code, err = sample(off, "--zero_cond_t", "on")
    assert code == 0 and seen[-1] is True and f"warning: --zero_cond_t on overrides the setting {off} was " \
                                              "trained with (off)" in err
    bare = _relabelled(trained_run, tmp_path / "bare.safetensors", base_model=None, zero_cond_t=None)
    assert sample(bare, "--model_version", "2509")[0] == 0 and seen[-1] is False  # no metadata: the flag's preset
    assert sample(None)[0] == 0 and seen[-1] is True                               # no LoRA: the default, 2511
