"""LongCat-Image-Edit (--model_version longcat) on its tiny model: the cache equals what diffusers'
LongCatImageEditPipeline feeds its transformer, our sampler equals the pipeline's __call__, the generic trainer
learns on a LongCat cache, the official layout loads and a Qwen cache is refused, the levers walk both block
stacks, and the app serves a LongCat LoRA (and refuses it on a Qwen base).

The pipeline resizes every input to about 1024x1024 pixels (``calculate_dimensions(1024 * 1024, ratio)``); we keep
phase 1's sizes. To compare at the tiny size, the tests point that one sizing function at the image's own size;
everything after it is the pipeline's code, unchanged."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from edittuner.cache import CacheReader
from edittuner.dataset import load_dataset
from edittuner.errors import EditTunerError
from edittuner.images import ResizeConfig
from edittuner.families import model_spec
from edittuner.families.longcat_image_edit.encoding import LongCatSampleEncoder
from edittuner.families.longcat_image_edit.tiny import build_tiny_dit, build_tiny_encoders, build_tiny_scheduler
from edittuner.images import prepare_images
from edittuner.models import ModelSource
from edittuner.sampling import SamplerConfig, sample_edit_latents

LONGCAT = ModelSource(family="longcat-image-edit")
PROMPT = 'Write "OK" on the left side.'


@pytest.fixture(scope="module")
def pipe():
    """diffusers' LongCatImageEditPipeline from the tiny components (the same seeds our loaders use)."""
    from diffusers import LongCatImageEditPipeline
    enc = build_tiny_encoders(0)
    pipe = LongCatImageEditPipeline(scheduler=build_tiny_scheduler(), vae=enc.vae, text_encoder=enc.text_encoder,
                                    tokenizer=enc.tokenizer, text_processor=enc.text_processor,
                                    transformer=build_tiny_dit(0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture
def at_own_size(monkeypatch):
    """Make __call__ keep an image's size instead of resizing it to ~1024x1024 (see the module docstring)."""
    from diffusers.pipelines.longcat_image import pipeline_longcat_image_edit as module

    def use(image):
        monkeypatch.setattr(module, "calculate_dimensions", lambda area, ratio: image.size)
    return use


@pytest.fixture(scope="module")
def cache_lc(longcat_cache):
    return longcat_cache


@pytest.fixture(scope="module")
def encoder():
    encoder = LongCatSampleEncoder()
    encoder.attach(build_tiny_encoders(0), "cpu", torch.float32)
    return encoder


def _transformer_inputs(pipe, **call):
    """The keyword inputs of every transformer call __call__ makes."""
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw), with_kwargs=True)
    try:
        pipe(**call, num_inference_steps=1, output_type="latent")
    finally:
        hook.remove()
    return seen


def test_cache_is_what_the_pipeline_feeds_its_transformer(demo_dir, cache_lc, resize, pipe, at_own_size):
    """Bitwise: the cached prompt (positive and the CFG negative) and reference latents are the transformer's inputs
    in __call__; target and white latents are the pipeline's _encode_vae_image of the preprocessed image."""
    from diffusers.pipelines.longcat_image.pipeline_longcat_image_edit import LongCatImageEditPipeline as P

    manifest = json.loads((cache_lc / "manifest.json").read_text())
    samples = load_dataset(demo_dir / "dataset_single_ref.json")
    assert manifest["model_version"] == "longcat" and len(samples) == len(manifest["samples"]) >= 2
    for sample, record in list(zip(samples, manifest["samples"]))[:2]:
        cached = load_file(cache_lc / record["file"])
        target, refs, _ = prepare_images(sample, resize)
        at_own_size(refs[0])
        positive, negative = _transformer_inputs(pipe, image=refs[0], prompt=sample.prompt, negative_prompt="x",
                                                 guidance_scale=2.0)
        assert torch.equal(cached["prompt_emb"], positive["encoder_hidden_states"][0])
        c, h, w = cached["ref.0"].shape
        tokens = (h // 2) * (w // 2)
        assert torch.equal(P._pack_latents(cached["ref.0"][None], 1, c, h, w),
                           positive["hidden_states"][:, tokens:])
        assert cached["target"].shape == (16, target.height // 8, target.width // 8)
        for key, image in (("target", target), ("white", Image.new("RGB", target.size, "white"))):
            pixels = pipe.image_processor.preprocess(image, image.height, image.width)
            assert torch.equal(cached[key], pipe._encode_vae_image(pixels, generator=None)[0]), key
        with torch.no_grad():
            negative_emb = LongCatSampleEncoder.encode_prompt(_attached(pipe), "x", refs)
        assert torch.equal(negative_emb, negative["encoder_hidden_states"][0])


def _attached(pipe):
    encoder = LongCatSampleEncoder()
    encoder.pipe = pipe
    return encoder


def test_latents_are_normalised_like_the_real_vae(cache_lc):
    """The tiny VAE's calibrated shift/scale give the cached latents roughly zero mean and unit spread."""
    reader = CacheReader(cache_lc, expected_model_version="longcat")
    target = torch.cat([reader.load(i)["target"].flatten() for i in range(len(reader))])
    assert abs(float(target.mean())) < 0.3 and 0.5 < float(target.std()) < 2.0


@pytest.mark.parametrize("guidance", [4.5, 1.0])
def test_sampler_equals_the_pipeline(demo_dir, resize, pipe, encoder, at_own_size, guidance):
    """Our generic sampling path (encoder -> conditioning -> family.sample_flow -> decode) is bitwise __call__:
    same noise, sigmas and shift, true CFG when guidance > 1, same decoded image."""
    sample = load_dataset(demo_dir / "dataset_single_ref.json")[0]
    _, refs, _ = prepare_images(sample, resize)
    at_own_size(refs[0])
    spec = model_spec("longcat")
    encoded = encoder.encode(PROMPT, None, refs, None)
    negative = encoder.encode_prompt("", refs)
    ours = sample_edit_latents(pipe.transformer, encoded, SamplerConfig(steps=3, guidance=guidance, seed=7), spec,
                               "cpu", torch.float32, negative_prompt_emb=negative)
    call = dict(image=refs[0], prompt=PROMPT, num_inference_steps=3, guidance_scale=guidance)
    theirs = pipe(**call, generator=torch.Generator().manual_seed(7), output_type="latent").images
    c, h, w = ours.shape[1:]
    assert torch.equal(type(pipe)._pack_latents(ours, 1, c, h, w), theirs)
    image = pipe(**call, generator=torch.Generator().manual_seed(7)).images[0]
    assert np.array_equal(np.asarray(spec.family.decode(pipe.vae, ours)), np.asarray(image))


def test_mask_keeps_the_known_latents_outside(encoder, pipe):
    """keep=(mask, known): outside the mask the sampler ends on the known latents, inside it does not."""
    spec = model_spec("longcat")
    ref = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 48, 3), dtype=np.uint8))
    encoded = encoder.encode(PROMPT, None, [ref], None)
    known = encoded["ref.0"][None]
    mask = torch.zeros(1, 1, *known.shape[-2:])
    mask[..., :, : known.shape[-1] // 2] = 1
    denoiser = spec.family.denoiser(pipe.transformer)
    conditioning = spec.conditioning([encoded], "cpu", torch.float32, latent_hw=tuple(known.shape[-2:]))
    out = spec.family.sample_flow(denoiser, conditioning, None, tuple(known.shape), 4, 1.0,
                                  torch.Generator().manual_seed(0), keep=(mask, known), device="cpu",
                                  dtype=torch.float32)
    outside = mask.expand_as(known) == 0
    assert torch.allclose(out[outside], known[outside], atol=1e-5)
    assert not torch.allclose(out[~outside], known[~outside], atol=1e-2)


def test_ref_gt_is_encoded_as_the_pipeline_encodes_images_and_bridged_at_its_size(encoder, pipe):
    """ref_gt and the white image of its size: the pipeline's _encode_vae_image of the preprocessed image; the LBM
    sub stream to a ref_gt of another size than the target runs LongCat's transformer at that size."""
    from edittuner.configs import BridgeConfig
    from edittuner.objectives import LatentBridgeMatching

    rng = np.random.default_rng(1)
    target, ref, ref_gt = (Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
                           for h, w in ((48, 64), (48, 64), (64, 32)))
    sample = {**encoder.encode(PROMPT, target, [ref], None), **encoder.encode_ref_gt(ref_gt)}
    for key, image in (("ref_gt", ref_gt), ("ref_gt_white", Image.new("RGB", ref_gt.size, "white"))):
        pixels = pipe.image_processor.preprocess(image, image.height, image.width)
        assert torch.equal(sample[key], pipe._encode_vae_image(pixels, generator=None)[0]), key
    assert sample["ref_gt"].shape[-2:] == (8, 4) and sample["target"].shape[-2:] == (6, 8)
    spec = model_spec("longcat")
    objective = LatentBridgeMatching(BridgeConfig(sub_stream_probability=1.0, sub_stream_target="ref_gt"), spec)
    seen = []
    hook = pipe.transformer.register_forward_pre_hook(lambda m, a, kw: seen.append(kw["hidden_states"].shape),
                                                      with_kwargs=True)
    try:
        with torch.no_grad():
            loss = objective.losses(spec.family.denoiser(pipe.transformer), [sample], [0], "cpu", torch.float32)
    finally:
        hook.remove()
    assert torch.isfinite(loss).all() and seen[0][1] == 4 * 2 + 3 * 4   # packed 2x2: ref_gt's tokens, the ref's


def test_loss_is_the_flow_matching_target(cache_lc):
    """The denoiser's output is regressed on noise - x0 at x_sigma = (1 - sigma) x0 + sigma noise, sigma the
    timestep / 1000 of LongCat's shifted logit-normal schedule, each sample weighing 1."""
    scheduler = model_spec("longcat").family.training_scheduler()
    sigmas = scheduler.timesteps / 1000
    assert len(sigmas) == 1000 and bool((sigmas[:-1] > sigmas[1:]).all()) and 0 < float(sigmas.min())
    assert 0.70 < float(sigmas.median()) < 0.80   # shift exp(1.15) moves sigmoid(N(0, 1))'s median 0.5 to ~0.76
    x0, noise = torch.randn(1, 16, 4, 4), torch.randn(1, 16, 4, 4)
    t = scheduler.timesteps[123]
    assert torch.allclose(scheduler.add_noise(x0, noise, t), (1 - t / 1000) * x0 + t / 1000 * noise)
    assert torch.equal(scheduler.training_target(x0, noise, t), noise - x0)
    assert float(scheduler.training_weight(t)) == 1.0


@pytest.fixture(scope="module")
def trained(cache_lc, resize, tmp_path_factory):
    from edittuner.trainer import TrainConfig, train
    out = tmp_path_factory.mktemp("run_longcat")
    cfg = TrainConfig(cache_dir=cache_lc, output_dir=out, model=LONGCAT, model_version="longcat", resize=resize,
                      max_steps=30, learning_rate=5e-3, rank=8, save_every=30, validation_steps=30,
                      validation_samples=1, validation_inference_steps=2)
    return out, train(cfg, progress=False)


def test_training_on_a_longcat_cache_lowers_the_eval_loss(trained):
    """The generic trainer (flow objective, gradient checkpointing on) on a LongCat cache, with a CFG preview."""
    from edittuner.lora import read_lora_file
    out, result = trained
    assert result["eval_loss_end"] < 0.9 * result["eval_loss_start"], result
    config = json.loads((out / "config.json").read_text())
    assert config["model_version"] == "longcat"
    assert config["lora_targets"] == list(model_spec("longcat").preset.lora_targets)
    state, metadata = read_lora_file(out / "lora.safetensors")
    assert metadata["base_model"] == "LongCat-Image-Edit" and metadata["family"] == "longcat-image-edit"
    assert "diffusion_model.single_transformer_blocks.0.proj_mlp.lora_A.weight" in state
    assert (out / "validation/step-000030.png").is_file()


def test_sample_cli_edits_with_the_trained_lora(trained, demo_dir, tmp_path, capsys):
    """`edittuner sample` picks the family from the LoRA's metadata and edits at the reference's size."""
    from edittuner import cli
    from conftest import TINY_PIXELS
    sample = load_dataset(demo_dir / "dataset_single_ref.json")[0]
    output = tmp_path / "edit.png"
    code = cli.main(["sample", "--lora", str(trained[0] / "lora.safetensors"), "--image", str(sample.edit_images[0]),
                     "--prompt", PROMPT, "--output", str(output), "--steps", "2", "--guidance", "2",
                     "--max_pixels", str(TINY_PIXELS)])
    assert code == 0, capsys.readouterr().err
    fitted = LongCatSampleEncoder().fit_reference(Image.open(sample.edit_images[0]),
                                                  ResizeConfig(max_pixels=TINY_PIXELS))
    assert Image.open(output).size == fitted.size


def test_a_batch_equals_its_samples_one_by_one(encoder, pipe):
    """Two same-shape samples in one forward (per-sample timesteps) equal two batch-1 forwards; a batch whose
    prompts differ in length is refused (the transformer takes no attention mask)."""
    spec = model_spec("longcat")
    rng = np.random.default_rng(1)
    refs = [Image.fromarray(rng.integers(0, 255, (64, 48, 3), dtype=np.uint8)) for _ in range(2)]
    samples = [encoder.encode(p, r, [r], None) for p, r in zip((PROMPT, "Make it blue."), refs)]
    denoiser = spec.family.denoiser(pipe.transformer)
    latents = torch.randn(2, *samples[0]["target"].shape, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([300.0, 700.0])
    with torch.no_grad():
        batched = denoiser(latents=latents, timestep=timesteps, **spec.conditioning(samples, "cpu", torch.float32))
        alone = [denoiser(latents=latents[i:i + 1], timestep=timesteps[i:i + 1],
                          **spec.conditioning([samples[i]], "cpu", torch.float32)) for i in range(2)]
        row = denoiser(latents=latents[1:], timestep=timesteps[1:], **spec.family.select_rows(
            spec.conditioning(samples, "cpu", torch.float32), [1]))
    assert torch.allclose(batched, torch.cat(alone), atol=1e-5, rtol=1e-5)   # float reassociation only
    assert torch.equal(row, alone[1])
    short = {**samples[1], "prompt_emb": samples[1]["prompt_emb"][:-1]}
    with pytest.raises(EditTunerError, match="no attention mask"):
        spec.conditioning([samples[0], short], "cpu", torch.float32)


def test_a_qwen_cache_is_refused(demo_cache, tmp_path, capsys):
    """`edittuner train --model_version longcat` on a Qwen-Image-Edit cache: one message saying what to run."""
    from edittuner import cli
    code = cli.main(["train", "--cache_dir", str(demo_cache), "--output_dir", str(tmp_path / "run"),
                     "--model_version", "longcat", "--max_steps", "1"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "was made for --model_version 2511 (Qwen-Image-Edit-2511), but this run trains --model_version longcat " \
           "(LongCat-Image-Edit), another model family" in err
    assert "edittuner precompute --model_version longcat" in err


def test_official_layout_loads_and_incomplete_folders_are_listed(pipe, tmp_path, encoder):
    """The folder diffusers' save_pretrained writes is the official layout: our loaders read it back to the same
    encoding; a folder missing files is one error listing them all."""
    folder = tmp_path / "LongCat-Image-Edit"
    pipe.save_pretrained(folder, safe_serialization=True)
    source = ModelSource(family="longcat-image-edit", model_dir=str(folder))
    source.check(model_spec("longcat").family.components)
    dit, encoders = source.load_dit(), source.load_encoders()
    assert all(torch.equal(a, b) for a, b in zip(dit.state_dict().values(), pipe.transformer.state_dict().values()))
    loaded = LongCatSampleEncoder()
    loaded.attach(encoders, "cpu", torch.float32)
    ref = Image.new("RGB", (48, 64), (200, 30, 90))
    assert torch.equal(loaded.encode_prompt(PROMPT, [ref]), encoder.encode_prompt(PROMPT, [ref]))
    assert torch.equal(loaded.encode_image(ref), encoder.encode_image(ref))
    assert source.encoder_fingerprint().startswith("longcat-dir:")
    (folder / "vae/diffusion_pytorch_model.safetensors").unlink()
    (folder / "tokenizer/tokenizer_config.json").unlink()
    with pytest.raises(EditTunerError) as error:
        source.check(model_spec("longcat").family.components)
    message = str(error.value)
    assert "vae/diffusion_pytorch_model.safetensors" in message and "tokenizer/tokenizer_config.json" in message


def test_overlong_prompt_and_other_reference_counts_are_refused(encoder):
    ref = Image.new("RGB", (48, 48))
    with pytest.raises(EditTunerError, match="at most 512"):
        encoder.encode_prompt("a" * 600, [ref])
    with pytest.raises(EditTunerError, match="exactly one reference"):
        encoder.encode_prompt(PROMPT, [ref, ref])
    family = model_spec("longcat").family
    assert "takes exactly 1" in family.reference_refusal(family.presets["longcat"], 2)


def test_launcher_trains_longcat_end_to_end(demo_dir, tmp_path):
    """LongCat-Image-Edit.sh on the tiny model: both phases, previews, the eval loss falling, the LoRA's family."""
    import os
    import shutil
    import subprocess

    from conftest import ROOT
    from edittuner.lora import read_lora_file
    shutil.copytree(demo_dir, tmp_path / "demo")
    env = {"DATASET_JSON": str(tmp_path / "demo/dataset_single_ref.json"), "CACHE_DIR": str(tmp_path / "cache"),
           "OUTPUT_DIR": str(tmp_path / "run"), "STEPS": "30", "NUM_PROCESSES": "1", "VALIDATION_STEPS": "30",
           "VALIDATION_INFERENCE_STEPS": "2"}
    result = subprocess.run(["bash", str(ROOT / "LongCat-Image-Edit.sh")], capture_output=True, text=True, cwd=ROOT,
                            env={**os.environ, **env}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("LongCat-Image-Edit: no MODEL_DIR set")
    assert json.loads((tmp_path / "run/config.json").read_text())["model_version"] == "longcat"
    summary = json.loads((tmp_path / "run/summary.json").read_text())
    assert summary["eval_loss_end"] < 0.9 * summary["eval_loss_start"], summary
    assert (tmp_path / "run/validation/step-000030.png").is_file()
    _, metadata = read_lora_file(tmp_path / "run/lora.safetensors")
    assert (metadata["family"], metadata["base_model"]) == ("longcat-image-edit", "LongCat-Image-Edit")


# ---- the levers over both block stacks (Family.blocks) ----------------------------------------------------------

def _lever_sample(seed=0):
    from edittuner.families.qwen_image_edit.tiny import TINY_TEXT_DIM
    g = torch.Generator().manual_seed(seed)
    return {"target": torch.randn(16, 8, 6, generator=g), "ref.0": torch.randn(16, 8, 6, generator=g),
            "prompt_emb": torch.randn(19, TINY_TEXT_DIM, generator=g)}


def _lever_dit(**levers):
    """The tiny LongCat transformer as phase 2 builds it (trainer.build_model: levers, LoRA from the seed), with
    LoRA B made non-zero so that every LoRA gradient depends on the base weights."""
    from edittuner.performance import PerformanceConfig
    from edittuner.trainer import TrainConfig, build_model
    cfg = TrainConfig(cache_dir="unused", output_dir="unused", model=LONGCAT, model_version="longcat", rank=4,
                      performance=PerformanceConfig(**levers))
    dit, _, offload = build_model(cfg, torch.device("cpu"), torch.float32)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, p in dit.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return dit, offload


def _lever_loss(dit, sample, timestep=500.0):
    spec = model_spec("longcat")
    conditioning = spec.conditioning([sample], "cpu", torch.float32, gradient_checkpointing=True)
    out = spec.family.denoiser(dit)(latents=sample["target"][None], timestep=torch.tensor([timestep]), **conditioning)
    loss = (out - sample["target"][None]).pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in dit.named_parameters() if p.grad is not None}
    dit.zero_grad(set_to_none=True)
    return loss.detach(), grads


def test_levers_walk_the_double_and_the_single_stream_blocks():
    """Family.blocks gives both stacks in forward order; block offload over them (the trainer's place_dit) gives
    the resident run's loss and gradients bitwise, over two steps under gradient checkpointing, with the single-
    stream blocks' frozen weights off the device between runs; an int8 base (build_model's torchao path) quantizes
    the single-stream blocks too and trains like the full base (test_performance.py's tolerances)."""
    from edittuner.performance import PerformanceConfig, place_dit, quantized_bytes
    family = model_spec("longcat").family
    plain, _ = _lever_dit()
    blocks = family.blocks(plain)
    assert blocks == [*plain.transformer_blocks, *plain.single_transformer_blocks] and len(blocks) == 2
    offloaded, _ = _lever_dit()
    offload = place_dit(offloaded, family.blocks(offloaded), PerformanceConfig(offload_blocks=True),
                        torch.device("cpu"))
    single = [p for p in offloaded.single_transformer_blocks.parameters() if not p.requires_grad]
    assert single and all(p.numel() == 0 for p in single)
    for step in range(2):
        sample = _lever_sample(step)
        reference, result = _lever_loss(plain, sample), _lever_loss(offloaded, sample)
        assert torch.equal(reference[0], result[0]) and reference[1].keys() == result[1].keys()
        assert all(torch.equal(reference[1][n], result[1][n]) for n in reference[1])
    assert offload.copies == 2 * 2 * len(blocks) - 1 and 1 <= offload.max_resident <= 2   # fwd + recompute each

    int8, _ = _lever_dit(base_quantization="int8")
    full = quantized_bytes(plain.single_transformer_blocks)
    assert quantized_bytes(int8.single_transformer_blocks) < 0.45 * full   # int8 + per-row scales + fp32 biases
    assert quantized_bytes(int8.transformer_blocks) < 0.45 * quantized_bytes(plain.transformer_blocks)
    sample = _lever_sample(5)
    (loss, grads), (reference, ref_grads) = _lever_loss(int8, sample), _lever_loss(plain, sample)
    assert abs(float(loss) - float(reference)) < 1e-3 * float(reference)
    assert grads.keys() == ref_grads.keys()
    # The whole LoRA gradient within 2% (measured 1.2% on the fitted tiny base), each layer's in the same direction:
    # the text stream's layers get gradients 20-50x smaller than the image stream's, and int8 rounding moves them by
    # up to 12% of their own size (cosine 0.993).
    flat = lambda g: torch.cat([v.flatten() for v in g.values()])  # noqa: E731
    assert (flat(grads) - flat(ref_grads)).norm() < 2e-2 * flat(ref_grads).norm()
    for name, g in ref_grads.items():
        assert torch.nn.functional.cosine_similarity(grads[name].flatten(), g.flatten(), dim=0) > 0.99, name


# ---- the app on a LongCat base ----------------------------------------------------------------------------------

def test_app_serves_a_longcat_lora_and_a_qwen_base_refuses_it(trained, demo_dir, pipe, at_own_size, tmp_path):
    """app_gradio.py --model_version longcat: the app's session edits with the trained LongCat LoRA (version from
    its metadata) as diffusers' pipeline does with that LoRA in diffusers' layout loaded by peft
    (``load_lora_adapter``: diffusers has no LongCat LoRA loader of its own); the same LoRA picked in an app on the
    Qwen base is refused with the flag to start it with."""
    import shutil

    from conftest import TINY_PIXELS
    pytest.importorskip("gradio")
    from edittuner.app import EditSession, build_parser, load_editor
    from edittuner.images import load_rgb
    from edittuner.lora import export_lora
    train_dir = tmp_path / "train"
    (train_dir / "lc").mkdir(parents=True)
    shutil.copy(trained[0] / "lora.safetensors", train_dir / "lc/lora.safetensors")
    source = load_rgb(load_dataset(demo_dir / "dataset_single_ref.json")[0].edit_images[0])
    common = ["--max_pixels", str(TINY_PIXELS)]
    session = EditSession(load_editor(build_parser().parse_args(["--model_version", "longcat", *common])), train_dir,
                          output_dir=tmp_path / "out")
    edit = dict(source=source, reference_2=None, reference_3=None, prompt=PROMPT, strength=1.0, sampler="flow",
                steps=2, guidance=2.0, seed=7, negative_prompt="")
    image, _, status = session.edit(lora="lc/lora.safetensors", **edit)
    assert "LoRA lc/lora.safetensors at 1" in status and "LongCat-Image-Edit" in status and "warning" not in status
    base_image, _, _ = session.edit(lora=None, **edit)

    export_lora(trained[0] / "lora.safetensors", tmp_path / "diffusers.safetensors", "diffusers")
    ref = session.editor.encoder.fit_reference(source, session.editor.resize)
    at_own_size(ref)
    pipe.transformer.load_lora_adapter(str(tmp_path / "diffusers.safetensors"), prefix="transformer",
                                       adapter_name="app")
    try:
        theirs = pipe(image=ref, prompt=PROMPT, num_inference_steps=2, guidance_scale=2.0,
                      generator=torch.Generator().manual_seed(7)).images[0]
    finally:
        pipe.transformer.delete_adapters("app")
    ours, theirs = np.asarray(image, dtype=np.int16), np.asarray(theirs, dtype=np.int16)
    # LoRA as forward hooks (x A^T B^T scale) against peft's layers: the same sums in another order, so a pixel
    # may round the other way.
    assert ours.shape == theirs.shape and np.abs(ours - theirs).max() <= 1
    assert np.abs(ours - np.asarray(base_image, dtype=np.int16)).mean() > 1   # the LoRA acted

    qwen = EditSession(load_editor(build_parser().parse_args(common)), train_dir, output_dir=tmp_path / "out-qwen")
    with pytest.raises(EditTunerError, match=r"LoRA lc/lora.safetensors was trained for LongCat-Image-Edit \(the "
                                             r"longcat-image-edit family\), but the base model loaded is a "
                                             r"qwen-image-edit model; start with --model_version longcat"):
        qwen.edit(lora="lc/lora.safetensors", **edit)
    assert qwen.lora_key is None and qwen.editor.model_version == "2511"
