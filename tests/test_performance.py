"""The speed and memory levers (edittuner/performance.py): each one gives the loss and gradients of the plain
run, each is switchable from the CLI and the launchers, and each refuses clearly where it cannot run."""

import json

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, TINY_PIXELS, run_cli, tiny_dit_with_lora
from edittuner.errors import EditTunerError
from edittuner.families.qwen_image_edit.models import EditDiT
from edittuner.families.qwen_image_edit.denoiser import collate_conditioning
from edittuner.families.qwen_image_edit.denoiser import DiTDenoiser
from edittuner.performance import (BlockOffload, PerformanceConfig, attention_backend, check_levers, compile_blocks,
                                   quantize_base, quantized_bytes)
from edittuner.families.qwen_image_edit.tiny import TINY_TEXT_DIM, build_tiny_dit
from edittuner.tracking import read_metrics
from edittuner.trainer import TrainConfig, train

CPU = torch.device("cpu")


def _sample(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"target": torch.randn(16, 12, 16, generator=g), "ref.0": torch.randn(16, 12, 16, generator=g),
            "prompt_emb": torch.randn(23, TINY_TEXT_DIM, generator=g)}


def _lora_dit(dit=None):
    return tiny_dit_with_lora(dit, dit_seed=1)


def _loss_and_grads(dit, sample, checkpointing=True, timestep=500.0):
    conditioning = collate_conditioning([sample], "cpu", torch.float32, True, checkpointing)
    out = DiTDenoiser(dit)(latents=sample["target"][None], timestep=torch.tensor([timestep]), **conditioning)
    loss = (out - sample["target"][None]).pow(2).mean()
    loss.backward()
    grads = {n: p.grad.clone() for n, p in dit.named_parameters() if p.grad is not None}
    dit.zero_grad(set_to_none=True)
    return loss.detach(), grads


def _assert_same(a, b, atol):
    loss_a, grads_a = a
    loss_b, grads_b = b
    assert grads_a.keys() == grads_b.keys() and len(grads_a) > 0
    torch.testing.assert_close(loss_b, loss_a, rtol=0, atol=atol)
    for name in grads_a:
        torch.testing.assert_close(grads_b[name], grads_a[name], rtol=1e-4, atol=atol, msg=name)


@pytest.mark.parametrize("kernel", ["sdpa", "flash", "math"])
def test_attention_kernels_give_the_engine_default_loss_and_gradients(kernel):
    sample = _sample()
    reference = _loss_and_grads(_lora_dit(), sample)
    with attention_backend(kernel):
        result = _loss_and_grads(_lora_dit(), sample)
    _assert_same(reference, result, atol=1e-5)


def test_attention_kernel_choice_is_enforced_and_undone():
    import diffsynth.models.qwen_image_dit as engine_dit
    q = torch.randn(1, 2, 8, 16)
    before = engine_dit.FLASH_ATTN_3_AVAILABLE
    with attention_backend("efficient"):  # a CUDA-only kernel: on the CPU, SDPA has nothing left to run
        assert engine_dit.FLASH_ATTN_3_AVAILABLE is False
        with pytest.raises(RuntimeError):
            engine_dit.qwen_image_flash_attention(q, q, q, num_heads=2)
    assert engine_dit.FLASH_ATTN_3_AVAILABLE == before
    engine_dit.qwen_image_flash_attention(q, q, q, num_heads=2)


def test_block_offload_gives_the_same_training_and_keeps_weights_off_the_device():
    """On the CPU the 'device' copy is a fresh tensor, so the bookkeeping is what a GPU run does: the frozen
    weights are placeholders except while their block runs, at most two blocks are in at once, and loss and
    gradients equal the run with every weight resident, bitwise, over forward, backward and an optimizer step."""
    plain, offloaded = _lora_dit(), _lora_dit()
    offload = BlockOffload(offloaded.transformer_blocks, CPU)
    frozen = [p for p in offloaded.transformer_blocks.parameters() if not p.requires_grad]
    assert frozen and all(p.numel() == 0 for p in frozen)
    optimizers = [torch.optim.AdamW([p for p in m.parameters() if p.requires_grad], lr=1e-2) for m in (plain, offloaded)]
    for step in range(3):
        sample = _sample(step)
        for model, optimizer in zip((plain, offloaded), optimizers):
            conditioning = collate_conditioning([sample], "cpu", torch.float32, True, True)
            out = DiTDenoiser(model)(latents=sample["target"][None], timestep=torch.tensor([700.0]), **conditioning)
            (out - sample["target"][None]).pow(2).mean().backward()
        for a, b in zip(plain.parameters(), offloaded.parameters()):
            if a.requires_grad:
                assert torch.equal(a.grad, b.grad)
        for optimizer in optimizers:
            optimizer.step()
            optimizer.zero_grad()
    blocks = len(offloaded.transformer_blocks)
    # Each block is copied in for the forward pass and again for its recompute, except that the first block,
    # recomputed last, is still in when the next step's forward pass starts.
    assert offload.copies == 3 * 2 * blocks - 2
    assert 1 <= offload.max_resident <= 2
    with torch.no_grad():  # evaluation and previews: one pass, every block dropped after it runs
        sample = _sample(9)
        conditioning = collate_conditioning([sample], "cpu", torch.float32, True)
        a = DiTDenoiser(plain)(latents=sample["target"][None], timestep=torch.tensor([300.0]), **conditioning)
        b = DiTDenoiser(offloaded)(latents=sample["target"][None], timestep=torch.tensor([300.0]), **conditioning)
    assert torch.equal(a, b) and offload.resident == set()
    offload.release()
    for name, p in offloaded.named_parameters():
        if not p.requires_grad and name.startswith("transformer_blocks."):
            assert p.numel() == 0, name


def test_int8_base_quarters_the_block_weights_and_trains_like_the_full_base():
    dit = build_tiny_dit(1)
    full = quantized_bytes(dit.transformer_blocks)
    quantize_base(list(dit.transformer_blocks), "int8", CPU)
    assert quantized_bytes(dit.transformer_blocks) < 0.45 * full  # int8 + per-row scales + fp32 norms/biases
    sample = _sample()
    reference = _loss_and_grads(_lora_dit(), sample)
    loss, grads = _loss_and_grads(_lora_dit(dit), sample)
    assert abs(float(loss) - float(reference[0])) < 1e-3 * float(reference[0])
    for name, g in reference[1].items():
        assert (grads[name] - g).norm() < 2e-2 * g.norm() + 1e-6, name


def _train(cache, out, resize, steps=4, **levers):
    cfg = TrainConfig(cache_dir=cache, output_dir=out, resize=resize, max_steps=steps, learning_rate=2e-3, rank=4,
                      gradient_accumulation=1, eval_samples=2, save_every=1000, validation_steps=0,
                      performance=PerformanceConfig(**levers))
    summary = train(cfg, progress=False)
    return [m["loss"] for m in read_metrics(out / "metrics.jsonl")], summary


def test_int8_run_tracks_the_full_precision_run_and_its_lora_loads_anywhere(demo_cache, resize, tmp_path):
    losses, _ = _train(demo_cache, tmp_path / "full", resize)
    losses_int8, summary = _train(demo_cache, tmp_path / "int8", resize, base_quantization="int8")
    # Within 0.5%, or 2e-5 where a step's loss is itself ~1e-3 (late steps on the fitted tiny base: measured 1.1e-5).
    assert losses_int8 == pytest.approx(losses, rel=5e-3, abs=2e-5)
    config = json.loads((tmp_path / "int8/config.json").read_text())
    assert config["performance"]["base_quantization"] == "int8" and "int8 base" in config["resolved"]["performance"]
    # The LoRA is a plain bf16/fp32 file: it loads into an unquantized model as any other.
    state = load_file(tmp_path / "int8/lora.safetensors")
    assert all(t.dtype == torch.float32 for t in state.values())
    full = load_file(tmp_path / "full/lora.safetensors")
    assert state.keys() == full.keys()
    assert summary["eval_loss_end"] < summary["eval_loss_start"]


def test_compiled_blocks_give_the_eager_loss_and_share_one_graph():
    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    dit = EditDiT(num_layers=4, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=TINY_TEXT_DIM,
                  axes_dims_rope=(4, 6, 6))
    eager = _lora_dit(dit)
    compiled = _lora_dit(EditDiT(num_layers=4, attention_head_dim=16, num_attention_heads=2,
                                 joint_attention_dim=TINY_TEXT_DIM, axes_dims_rope=(4, 6, 6)))
    compiled.load_state_dict(eager.state_dict())
    compile_blocks(list(compiled.transformer_blocks))
    assert list(compiled.state_dict()) == list(eager.state_dict())  # LoRA keys untouched by compiling
    sample = _sample()
    for checkpointing in (True, False):
        _assert_same(_loss_and_grads(eager, sample, checkpointing), _loss_and_grads(compiled, sample, checkpointing),
                     atol=1e-5)
    # 4 identical blocks, one compiled graph each way (not one per block): regional compilation pays once.
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] <= 2
    torch._dynamo.reset()


@pytest.mark.parametrize("levers, where, message", [
    ({"base_quantization": "fp8"}, {}, "fp8 weights need a CUDA GPU"),
    ({"offload_blocks": True}, {}, "this run is on the CPU, where the weights already are"),
    ({"attention": "efficient"}, {}, "runs on CUDA GPUs only"),
    ({"attention": "cudnn"}, {}, "runs on CUDA GPUs only"),
    ({"attention": "flash"}, {"batch_size": 2}, "need an attention mask"),
    ({"base_quantization": "int8"}, {"zero_stage": 3}, "ZeRO partitions plain tensors"),
    ({"compile": True}, {"zero_stage": 3}, "--compile under DeepSpeed ZeRO-3"),
])
def test_levers_refuse_where_they_cannot_run(levers, where, message):
    with pytest.raises(EditTunerError, match=message.replace("(", r"\(")):
        check_levers(PerformanceConfig(**levers), CPU, torch.float32, **where)


def test_offload_refusals_on_a_gpu_are_checked_before_any_model_loads(monkeypatch):
    cuda = torch.device("cuda", 0)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    for levers, where, message in [({"offload_blocks": True}, {"gradient_checkpointing": False}, "needs --gradient_checkpointing on"),
                                   ({"offload_blocks": True, "base_quantization": "int8"}, {}, "not combined"),
                                   ({"offload_blocks": True, "compile": True}, {}, "pick one"),
                                   ({"offload_blocks": True}, {"zero_stage": 3}, "zero3_offload"),
                                   ({"attention": "flash"}, {}, "takes bf16/fp16")]:
        with pytest.raises(EditTunerError, match=message):
            check_levers(PerformanceConfig(**levers), cuda, torch.float32, **where)
    check_levers(PerformanceConfig(attention="flash", offload_blocks=True), cuda, torch.bfloat16)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "NVIDIA A100-SXM4-80GB")
    with pytest.raises(EditTunerError, match="A100-SXM4-80GB has no fp8 support"):
        check_levers(PerformanceConfig(base_quantization="fp8"), cuda, torch.bfloat16)
    with pytest.raises(EditTunerError, match="needs a Hopper GPU"):
        check_levers(PerformanceConfig(attention="cudnn"), cuda, torch.bfloat16)


def test_bad_lever_names_and_cpu_refusals_from_the_cli(demo_cache, tmp_path):
    with pytest.raises(EditTunerError, match="--attention fastest: choose one of"):
        PerformanceConfig(attention="fastest")
    with pytest.raises(EditTunerError, match="--base_quantization int4"):
        PerformanceConfig(base_quantization="int4")
    common = ["train", "--cache_dir", demo_cache, "--output_dir", tmp_path / "run", "--model_dir", "tiny",
              "--max_pixels", TINY_PIXELS]
    result = run_cli(*common, "--base_quantization", "fp8")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--base_quantization fp8: fp8 weights need a CUDA GPU" in result.stderr
    assert not (tmp_path / "run").exists()


def test_launcher_passes_the_levers(demo_dir, tmp_path):
    import os
    import shutil
    import subprocess
    shutil.copytree(demo_dir, tmp_path / "demo")
    env = {**os.environ, "DATASET_JSON": str(tmp_path / "demo/dataset.json"), "CACHE_DIR": str(tmp_path / "cache"),
           "OUTPUT_DIR": str(tmp_path / "run"), "STEPS": "2", "VALIDATION_STEPS": "0", "ATTENTION": "math",
           "BASE_QUANTIZATION": "int8", "COMPILE": "off"}
    result = subprocess.run(["bash", str(ROOT / "Qwen-Image-Edit-2511.sh")], capture_output=True, text=True, cwd=ROOT,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    performance = json.loads((tmp_path / "run/config.json").read_text())["performance"]
    assert performance == {"attention": "math", "compile": False, "base_quantization": "int8", "offload_blocks": False}


def test_int8_base_for_sampling_keeps_the_edit_and_takes_a_lora(trained_run, resize, demo_dir):
    from edittuner.images import load_rgb
    from edittuner.sampling import Editor, SamplerConfig
    source = load_rgb(demo_dir / "raw/source/03_rocket.png")
    sampler = SamplerConfig(sampler="flow", steps=3, guidance=1.0, seed=3)
    full, int8 = Editor(resize=resize), Editor(resize=resize, base_quantization="int8")
    assert quantized_bytes(int8.dit.transformer_blocks) < 0.45 * quantized_bytes(full.dit.transformer_blocks)
    lora = trained_run[0] / "lora.safetensors"
    for editor in (full, int8):
        editor.set_lora(lora, 1.0)
    a = full.edit([source], "make it blue", sampler).latents
    b = int8.edit([source], "make it blue", sampler).latents
    assert (a - b).norm() < 0.02 * a.norm()
    int8.set_lora(None)
    assert (int8.edit([source], "make it blue", sampler).latents - b).norm() > 0.01 * b.norm()  # the LoRA acted


def test_fp8_sampling_is_refused_on_the_cpu_with_one_message(tmp_path, demo_dir):
    result = run_cli("sample", "--image", demo_dir / "raw/source/03_rocket.png", "--prompt", "x", "--output", tmp_path / "o.png",
                     "--base_quantization", "fp8")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--base_quantization fp8: fp8 weights need a CUDA GPU" in result.stderr
