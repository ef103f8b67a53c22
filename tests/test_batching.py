"""Batch > 1: the batched DiT forward against the engine's batch-1 model function, and batched training against
gradient accumulation over the same samples at batch 1."""

import json
import os
import subprocess

import pytest
import torch
from diffsynth.pipelines.qwen_image import model_fn_qwen_image
from safetensors.torch import load_file

from conftest import ROOT, absolute_rows, run_cli, tiny_dit_with_lora
from edittuner.families.qwen_image_edit.denoiser import batched_model_fn, collate_conditioning
from edittuner.batching import shape_groups
from edittuner.errors import EditTunerError
from edittuner.objectives import FlowMatchConfig, flow_matching_losses
from edittuner.families.qwen_image_edit.denoiser import DiTDenoiser, training_scheduler
from edittuner.families.qwen_image_edit.tiny import TINY_TEXT_DIM, build_tiny_dit
from edittuner.tracking import read_metrics
from edittuner.trainer import TrainConfig, make_runtime, train

SAME_SHAPE_IDS = ("00_astronaut", "04_hubble_deep_field", "05_immunohistochemistry", "07_moon")  # 96x96, one ref


@pytest.mark.parametrize("zero_cond_t", [False, True])
def test_batched_forward_equals_engine_calls_per_sample(zero_cond_t):
    dit = build_tiny_dit(1)
    g = torch.Generator().manual_seed(0)
    lengths = [37, 20, 29]  # different prompt lengths: padded, masked
    latents = torch.randn(3, 16, 8, 12, generator=g)
    refs = [torch.randn(3, 16, 8, 12, generator=g), torch.randn(3, 16, 6, 6, generator=g)]
    timesteps = torch.tensor([900.0, 300.0, 51.0])
    prompts = [torch.randn(n, TINY_TEXT_DIM, generator=g) for n in lengths]
    samples = [{"target": latents[i], "ref.0": refs[0][i], "ref.1": refs[1][i], "prompt_emb": prompts[i]}
               for i in range(3)]
    conditioning = collate_conditioning(samples, "cpu", torch.float32, zero_cond_t)
    assert conditioning["prompt_emb"].shape[1] == 37 and conditioning["prompt_emb_mask"].sum().item() == sum(lengths)
    batched = batched_model_fn(dit, latents, timesteps, **conditioning)
    for i in range(3):
        alone = model_fn_qwen_image(dit=dit, latents=latents[i:i + 1], timestep=timesteps[i:i + 1],
                                    **collate_conditioning([samples[i]], "cpu", torch.float32, zero_cond_t))
        assert (batched[i:i + 1] - alone).abs().max() < 1e-5


def _mask(sample):
    """A sample's edit mask as the loss takes it; None for a demo photo without red (no mask): batches mix both."""
    return sample["mask"][None] if "mask" in sample else None


def test_batched_losses_and_gradients_equal_mean_of_batch_1(demo_cache):
    dit = tiny_dit_with_lora()
    from edittuner.cache import CacheReader
    reader = CacheReader(demo_cache)
    samples = [reader.load(i) for i, r in enumerate(reader.records) if r["id"] in SAME_SHAPE_IDS[:3]]
    assert len(samples) == 3
    denoiser, scheduler, cfg = DiTDenoiser(dit), training_scheduler(), FlowMatchConfig(masked_weight=2.0)
    lora = [p for n, p in dit.named_parameters() if ".lora_" in n]
    seeds = [11, 12, 13]
    per_sample = []
    for sample, seed in zip(samples, seeds):
        loss = flow_matching_losses(denoiser, scheduler, [sample["target"][None]], [seed],
                                    collate_conditioning([sample], "cpu", torch.float32, True), cfg,
                                    [_mask(sample)])[0]
        (loss / len(samples)).backward()
        per_sample.append(loss.detach())
    grads_1 = [p.grad.clone() for p in lora]
    dit.zero_grad(set_to_none=True)
    losses = flow_matching_losses(denoiser, scheduler, [s["target"][None] for s in samples], seeds,
                                  collate_conditioning(samples, "cpu", torch.float32, True), cfg,
                                  [_mask(s) for s in samples])
    losses.mean().backward()
    torch.testing.assert_close(losses.detach(), torch.stack(per_sample), rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_1, (p.grad for p in lora)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


@pytest.fixture(scope="module")
def same_shape_cache(demo_dir, resize, tmp_path_factory):
    """The demo's 96x96 one-reference pairs, so that every micro-step is one batched forward."""
    from edittuner.cache import PrecomputeConfig, precompute_cache
    from edittuner.models import ModelSource
    work = tmp_path_factory.mktemp("same_shape")
    rows = absolute_rows(demo_dir, ids=SAME_SHAPE_IDS)
    (work / "dataset.json").write_text(json.dumps(rows))
    precompute_cache(PrecomputeConfig(dataset_json=work / "dataset.json", cache_dir=work / "cache",
                                      model=ModelSource(), resize=resize), progress=False)
    manifest = json.loads((work / "cache/manifest.json").read_text())
    assert len({json.dumps(r["shapes"].get("target")) for r in manifest["samples"]}) == 1
    return work / "cache"


def _run(cache, out, resize, batch_size, ga, steps=2, bucket_batches=True):
    cfg = TrainConfig(cache_dir=cache, output_dir=out, resize=resize, max_steps=steps, learning_rate=1e-3, rank=4,
                      gradient_accumulation=ga, batch_size=batch_size, gradient_checkpointing=False,
                      eval_samples=0, save_every=1000, bucket_batches=bucket_batches)
    train(cfg, progress=False)
    return [m["loss"] for m in read_metrics(out / "metrics.jsonl")], load_file(out / "lora.safetensors")


@pytest.mark.parametrize("cache_name, batch", [("same_shape_cache", 2), ("demo_cache", 4)])
def test_batch_size_run_equals_accumulation_at_batch_1(request, resize, tmp_path, cache_name, batch):
    """batch_size B, ga 1 sees the same samples, timesteps and noise as batch_size 1, ga B: same losses and LoRA.
    One bucket (same shapes): bucket batches are the plain order. On the demo cache (mixed shapes) with
    --bucket_batches off a micro-step splits into shape groups, weighted by size."""
    cache = request.getfixturevalue(cache_name)
    losses_b, lora_b = _run(cache, tmp_path / "b", resize, batch, 1, bucket_batches=cache_name == "same_shape_cache")
    losses_1, lora_1 = _run(cache, tmp_path / "one", resize, 1, batch)
    assert losses_b == pytest.approx(losses_1, rel=1e-5)
    # Adam divides each gradient element by its own size, so an element that is rounding noise (a near-zero
    # gradient: last-bit differences of the batched forward) moves by a different fraction of a step. Measured on the
    # 128-wide tiny DiT: 2 of 512 elements of one matrix differ by up to 0.18 of a step (lr 1e-3); all the rest
    # agree to 1e-6.
    for k in lora_1:
        close = torch.isclose(lora_b[k], lora_1[k], rtol=1e-4, atol=1e-6)
        assert close.float().mean() > 0.99 and (lora_b[k] - lora_1[k]).abs().max() < 0.5e-3, k


def test_shape_groups_keep_order():
    a, b = {"target": torch.zeros(16, 4, 4)}, {"target": torch.zeros(16, 4, 6)}
    assert shape_groups([a, b, a, dict(a, **{"ref.0": a["target"]}), b]) == [[0, 2], [1, 4], [3]]
    with pytest.raises(EditTunerError, match="one latent shape"):
        collate_conditioning([a, b], "cpu", torch.float32, True)


def test_bad_batch_size_is_refused(tmp_path):
    with pytest.raises(EditTunerError, match="--batch_size 0"):
        TrainConfig(cache_dir=tmp_path, output_dir=tmp_path, batch_size=0)


def test_batch_size_refused_under_deepspeed(tmp_path):
    cfg = TrainConfig(cache_dir=tmp_path, output_dir=tmp_path, batch_size=2, deepspeed_config=tmp_path / "zero3.json")
    with pytest.raises(EditTunerError, match="under DeepSpeed ZeRO"):
        make_runtime(cfg, "no")


def test_cli_and_launcher_refuse_bad_batch_size(demo_dir, demo_cache, tmp_path):
    result = run_cli("train", "--cache_dir", demo_cache, "--output_dir", tmp_path / "run", "--batch_size", "0")
    assert result.returncode != 0 and "--batch_size 0" in result.stderr and "Traceback" not in result.stderr
    for env, message in [({"BATCH_SIZE": "0"}, "BATCH_SIZE=0 (--batch_size): --batch_size 0: must be >= 1"),
                         ({"BATCH_SIZE": "2", "ACCELERATE_CONFIG": "accelerate_configs/zero3.yaml"},
                          "BATCH_SIZE=2 (--batch_size): --batch_size 2 under DeepSpeed ZeRO "
                          "(accelerate_configs/zero3.json)")]:
        result = subprocess.run(["bash", str(ROOT / "Qwen-Image-Edit-2511.sh")], capture_output=True, text=True,
                                cwd=ROOT, timeout=300,
                                env={**os.environ, "DATASET_JSON": str(demo_dir / "dataset.json"),
                                     "CACHE_DIR": str(tmp_path / "cache"), "OUTPUT_DIR": str(tmp_path / "run"), **env})
        assert result.returncode == 2 and message in result.stderr, result.stderr
        assert "phase 1" not in result.stdout and not (tmp_path / "cache").exists()


@pytest.mark.parametrize("main_stream_references", [True, False])
def test_batched_bridge_losses_and_gradients_equal_batch_1(same_shape_cache, main_stream_references):
    """LBM at batch 3: each sample's stream, bridge time and noise come from its own seed, so the batch mixes main
    and sub streams; with the references dropped from the main stream the batch splits into two forwards (one of
    a single sample, whose padded prompt is trimmed). Losses and gradients equal the batch-1 ones."""
    from edittuner.cache import CacheReader
    from edittuner.objectives import BridgeConfig, bridge_matching_losses
    dit = tiny_dit_with_lora()
    reader = CacheReader(same_shape_cache)
    samples = [reader.load(i) for i in range(3)]
    cfg = BridgeConfig(sigma=0.05, sub_stream_probability=0.5, main_stream_references=main_stream_references,
                       timestep_sampling="uniform", normalize_velocity=True, masked_weight=2.0)
    seeds = [3, 4, 11]  # with these seeds the draws take both streams
    denoiser, lora = DiTDenoiser(dit), [p for n, p in dit.named_parameters() if ".lora_" in n]
    streams, per_sample = [], []
    for sample, seed in zip(samples, seeds):
        torch.manual_seed(seed)
        streams.append(float(torch.rand(())) < cfg.sub_stream_probability)
        conditioning = collate_conditioning([sample], "cpu", torch.float32, True)
        loss = bridge_matching_losses(denoiser, [sample["target"][None]], [conditioning["edit_latents"][0]],
                                      [sample["white"][None]], [seed], conditioning, cfg)[0]
        (loss / len(samples)).backward()
        per_sample.append(loss.detach())
    assert len(set(streams)) == 2, streams
    grads_1 = [p.grad.clone() for p in lora]
    dit.zero_grad(set_to_none=True)
    losses = bridge_matching_losses(denoiser, [s["target"][None] for s in samples],
                                    [s["ref.0"][None] for s in samples], [s["white"][None] for s in samples],
                                    seeds, collate_conditioning(samples, "cpu", torch.float32, True), cfg)
    losses.mean().backward()
    torch.testing.assert_close(losses.detach(), torch.stack(per_sample), rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_1, (p.grad for p in lora)):
        torch.testing.assert_close(b, a, rtol=1e-4, atol=1e-6)


def test_lbm_batch_size_run_equals_accumulation_at_batch_1(same_shape_cache, resize, tmp_path):
    runs = {}
    for name, batch, ga in (("batch", 2, 1), ("one", 1, 2)):
        out = tmp_path / name
        cfg = TrainConfig(cache_dir=same_shape_cache, output_dir=out, resize=resize, max_steps=2, learning_rate=1e-3,
                          rank=4, gradient_accumulation=ga, batch_size=batch, gradient_checkpointing=False,
                          eval_samples=0, save_every=1000, objective="lbm", validation_steps=0)
        train(cfg, progress=False)
        runs[name] = [m["loss"] for m in read_metrics(out / "metrics.jsonl")], load_file(out / "lora.safetensors")
    assert runs["batch"][0] == pytest.approx(runs["one"][0], rel=1e-5)
    for k, v in runs["one"][1].items():
        torch.testing.assert_close(runs["batch"][1][k], v, rtol=1e-4, atol=1e-6)
