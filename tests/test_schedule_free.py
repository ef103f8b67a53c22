"""ProdigyPlusScheduleFree: averaged weights in checkpoints, training unaffected by saves, exact resume."""

import json

import pytest
import torch
from safetensors.torch import load_file

from edittuner.checkpoint import load_state
from edittuner.errors import EditTunerError
from edittuner.families import PRESETS
from edittuner.lora import inject_lora, lora_parameters, set_lora_state
from edittuner.families.qwen_image_edit.tiny import build_tiny_dit
from edittuner.tracking import read_metrics
from edittuner.trainer import TrainConfig, train


def _cfg(cache, resize, out, **kw):
    base = dict(cache_dir=cache, output_dir=out, resize=resize, max_steps=12, rank=4, gradient_accumulation=1,
                gradient_checkpointing=False, optimizer="prodigy_sf", objective="lbm", eval_samples=2)
    return TrainConfig(**{**base, **kw})


def test_clipping_and_warmup_are_refused_with_prodigy_sf(tmp_path):
    with pytest.raises(EditTunerError, match="clipping is refused"):
        TrainConfig(cache_dir=tmp_path, output_dir=tmp_path, optimizer="prodigy_sf", max_grad_norm=1.0)
    with pytest.raises(EditTunerError, match="constant lr"):
        TrainConfig(cache_dir=tmp_path, output_dir=tmp_path, optimizer="prodigy_sf", warmup_steps=10)
    cfg = TrainConfig(cache_dir=tmp_path, output_dir=tmp_path, optimizer="prodigy_sf")
    assert cfg.learning_rate == 1.0 and cfg.max_grad_norm == 0.0


def test_checkpoint_holds_the_averaged_weights(demo_cache, resize, tmp_path):
    out = tmp_path / "run"
    train(_cfg(demo_cache, resize, out, save_every=6), progress=False)
    metrics = read_metrics(out / "metrics.jsonl")
    assert all(m["d_lr"] > 0 and m["lr"] == 1.0 and m["grad_norm"] is None for m in metrics)
    written = load_file(out / "checkpoints/step-12/lora.safetensors")
    # Rebuild the optimizer from the checkpoint around the written weights (saved in eval mode): switching to
    # train mode must move them (the training view differs from the average), and eval() must land exactly
    # back on the written file: the file is the averaged (eval-mode) weights.
    from prodigyplus.prodigy_plus_schedulefree import ProdigyPlusScheduleFree
    dit = build_tiny_dit(0)
    inject_lora(dit, PRESETS["2511"].lora_targets, 4, 4.0)
    set_lora_state(dit, written, 4, 4.0)
    params = [p for _, p in lora_parameters(dit)]
    optimizer = ProdigyPlusScheduleFree(params, lr=1.0)
    optimizer.load_state_dict(load_state(out / "checkpoints/step-12", "optimizer"))
    assert optimizer.param_groups[0]["train_mode"] is False
    averaged = [p.detach().clone() for p in params]
    optimizer.train()
    assert any(not torch.allclose(p, a) for p, a in zip(params, averaged))
    optimizer.eval()
    assert all(torch.allclose(p, a, atol=1e-6) for p, a in zip(params, averaged))
    # The final file is the same averaged weights (eval<->train switches are fp32 round trips, hence not bitwise).
    final = load_file(out / "lora.safetensors")
    assert all(torch.allclose(final[k], written[k], atol=1e-6) for k in final)


def test_saves_do_not_disturb_training_and_resume_restores_the_optimizer(demo_cache, resize, tmp_path):
    often, once, resumed = tmp_path / "often", tmp_path / "once", tmp_path / "resumed"
    train(_cfg(demo_cache, resize, often, save_every=3), progress=False)
    train(_cfg(demo_cache, resize, once, save_every=1000), progress=False)
    train(_cfg(demo_cache, resize, resumed, save_every=6, max_steps=6), progress=False)
    train(_cfg(demo_cache, resize, resumed, save_every=6, resume="latest"), progress=False)
    reference = read_metrics(once / "metrics.jsonl")
    for run in (often, resumed):
        got = read_metrics(run / "metrics.jsonl")
        assert [m["loss"] for m in got] == [m["loss"] for m in reference]
        assert [m["d"] for m in got] == [m["d"] for m in reference]
        a, b = load_file(once / "lora.safetensors"), load_file(run / "lora.safetensors")
        assert all(torch.allclose(a[k], b[k], atol=1e-7) for k in a)


def test_lbm_training_runs_and_reports_the_bridge_distance(demo_cache, resize, tmp_path):
    out = tmp_path / "lbm"
    result = train(_cfg(demo_cache, resize, out, optimizer="adamw", learning_rate=5e-3, max_steps=30,
                        eval_samples=4), progress=False)
    # 30 steps: 1.756 -> 1.437 on the fitted tiny VAE's latents (2026-12-02)
    assert result["eval_loss_end"] < 0.9 * result["eval_loss_start"]
    assert result["bridge_1step_distance_ratio_end"] < result["bridge_1step_distance_ratio_start"]
    summary = json.loads((out / "summary.json").read_text())
    assert "bridge_1step_distance_ratio_end" in summary


def test_lbm_refuses_references_of_another_size(demo_cache, resize, tmp_path):
    import shutil
    cache = tmp_path / "cache"
    shutil.copytree(demo_cache, cache)
    manifest = json.loads((cache / "manifest.json").read_text())
    manifest["samples"][0]["shapes"]["ref.0"] = [16, 4, 4]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(EditTunerError, match="first reference"):
        train(_cfg(cache, resize, tmp_path / "r"), progress=False)


def test_prodigy_settings_reach_the_optimizer_are_fixed_on_resume_and_refused_with_adamw(tmp_path):
    from pathlib import Path
    from edittuner.configs import ProdigyConfig
    from edittuner.trainer import check_resume_settings, make_optimizer, run_settings
    tuned = ProdigyConfig(d0=1e-4, d_coef=2.0, betas=(0.95, 0.98), steps=7, bias_correction=True, factored=False)
    cfg = TrainConfig(cache_dir=tmp_path, output_dir=tmp_path, optimizer="prodigy_sf", weight_decay=0.05,
                      prodigy=tuned)
    optimizer, _ = make_optimizer(cfg, [torch.nn.Parameter(torch.zeros(3, 3))])
    group = optimizer.param_groups[0]
    assert (group["d0"], group["d"], group["d_coef"], group["betas"], group["prodigy_steps"],
            group["use_bias_correction"], group["factored"], group["weight_decay"]) == \
        (1e-4, 1e-4, 2.0, (0.95, 0.98), 7, True, False, 0.05)
    default = make_optimizer(TrainConfig(cache_dir=tmp_path, output_dir=tmp_path, optimizer="prodigy_sf"),
                             [torch.nn.Parameter(torch.zeros(3, 3))])[0].param_groups[0]
    assert (default["d0"], default["betas"], default["factored"]) == (1e-6, (0.9, 0.99), True)   # the package's
    saved = {"step": 1, **run_settings(cfg, "no", None)}
    other = TrainConfig(cache_dir=tmp_path, output_dir=tmp_path, optimizer="prodigy_sf", weight_decay=0.05,
                        prodigy=ProdigyConfig(d0=1e-5, d_coef=2.0, betas=(0.95, 0.98), steps=7, bias_correction=True,
                                              factored=False))
    with pytest.raises(EditTunerError, match='prodigy: checkpoint .*"d0": 0.0001'):
        check_resume_settings(Path("ckpt"), saved, other, run_settings(other, "no", None))
    with pytest.raises(EditTunerError, match="--prodigy_d0, --prodigy_steps: Prodigy's settings, but --optimizer is adamw"):
        TrainConfig(cache_dir=tmp_path, output_dir=tmp_path, prodigy=ProdigyConfig(d0=1e-4, steps=3))
    with pytest.raises(EditTunerError, match="--prodigy_betas 0.9,1.0: give two numbers"):
        ProdigyConfig(betas=(0.9, 1.0))
