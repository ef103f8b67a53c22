"""Validation previews during training and WandB run tracking (offline, read back from the run file)."""

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from edittuner.cache import CacheReader, PrecomputeConfig, precompute_cache, record_pixels
from edittuner.errors import EditTunerError
from edittuner.lora import lora_state_dict
from edittuner.models import ModelSource
from edittuner.tracking import read_metrics, resolve_report_to
from edittuner.trainer import TrainConfig, train


@pytest.fixture(scope="module")
def cache_with_validation(demo_dir, resize, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache_val")
    result = precompute_cache(PrecomputeConfig(dataset_json=demo_dir / "dataset.json", cache_dir=cache,
                                               model=ModelSource(), resize=resize,
                                               validation_json=demo_dir / "dataset_val.json"), progress=False)
    assert result["validation"]["encoded"] == 2
    return cache


def read_wandb_run(run_dir: Path) -> dict:
    """History rows, config and run name from an offline run's .wandb file (LevelDB-style log of protobufs)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    pos, chunks, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:
            pos += left
            continue
        length, kind = int.from_bytes(data[pos + 4:pos + 6], "little"), data[pos + 6]
        chunk = data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind == 1:
            chunks.append(chunk)
        elif kind == 2:
            pending = chunk
        elif kind == 3:
            pending += chunk
        elif kind == 4:
            chunks.append(pending + chunk)
    out = {"history": [], "config": {}, "name": None, "project": None}
    for chunk in chunks:
        record = pb.Record()
        record.ParseFromString(chunk)
        kind = record.WhichOneof("record_type")
        if kind == "history":
            out["history"].append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                                   for item in record.history.item})
        elif kind == "run":
            out["name"], out["project"] = record.run.display_name, record.run.project
            out["config"].update({item.key: json.loads(item.value_json) for item in record.run.config.update})
        elif kind == "config":
            out["config"].update({item.key: json.loads(item.value_json) for item in record.config.update})
    return out


def _cfg(cache, resize, out, **kw):
    base = dict(cache_dir=cache, output_dir=out, resize=resize, max_steps=6, learning_rate=5e-3, rank=4,
                gradient_accumulation=1, gradient_checkpointing=False, eval_samples=0, validation_steps=3,
                validation_inference_steps=2)
    return TrainConfig(**{**base, **kw})


def test_previews_and_wandb_offline_run(cache_with_validation, resize, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_NAME", "preview-test")
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    out = tmp_path / "run"
    train(_cfg(cache_with_validation, resize, out, report_to="wandb"), progress=False)
    grids = sorted(p.name for p in (out / "validation").glob("*.png"))
    assert grids == ["step-000000.png", "step-000003.png", "step-000006.png"]   # step 0: before training
    grid = Image.open(out / "validation/step-000006.png").convert("RGB")
    assert grid.height > 2 * 96  # one row per validation pair
    # The references and the target are the source pixels (as phase 1 sized them), not their VAE round trip.
    record = CacheReader(cache_with_validation / "validation").records[0]
    target, refs, _ = record_pixels(record, resize)
    scaled = [im.resize((round(im.width * 256 / im.height), 256), Image.Resampling.LANCZOS)
              for im in (*refs, target, target)]   # the output cell has the target's size
    left = sum(im.width + 4 for im in scaled[:-1])
    assert np.array_equal(np.asarray(grid.crop((left, 22, left + scaled[-1].width, 22 + 256))), np.asarray(scaled[-1]))
    assert np.array_equal(np.asarray(grid.crop((0, 22, scaled[0].width, 22 + 256))), np.asarray(scaled[0]))
    metrics = read_metrics(out / "metrics.jsonl")
    assert [m["step"] for m in metrics if "validation_time_s" in m] == [3, 6]
    assert all(m["peak_memory_gb"] > 0 and m["step_time_s"] > 0 for m in metrics)
    # Each preview scores its outputs against the targets (means over the pairs; per pair in step-N.json) and
    # takes the fixed-noise loss of the validation pairs; summary.json has the step-0 and last values.
    edit_keys = {"val_psnr", "val_ssim", "val_l1", "val_l1_in_mask", "val_l1_outside_mask", "val_eval_loss"}
    assert all(edit_keys <= set(m) for m in metrics if "validation_time_s" in m)
    assert not any("val_psnr" in m for m in metrics if "validation_time_s" not in m)
    pairs = json.loads((out / "validation/step-000006.json").read_text())
    assert len(pairs["pairs"]) == 2 and pairs["val_psnr"] == pytest.approx(metrics[-1]["val_psnr"])
    assert pairs["val_psnr"] == pytest.approx(sum(p["psnr"] for p in pairs["pairs"]) / 2)
    summary = json.loads((out / "summary.json").read_text())
    assert {f"{k}_{when}" for k in edit_keys for when in ("start", "end")} <= set(summary)
    assert summary["val_psnr_end"] == metrics[-1]["val_psnr"]
    assert summary["val_psnr_start"] == json.loads((out / "validation/step-000000.json").read_text())["val_psnr"]
    assert (out / "metrics.png").is_file()

    run = read_wandb_run(next((out / "wandb").glob("offline-run-*")))
    assert run["project"] == "qwen-image" and run["name"] == "preview-test"
    assert run["config"]["learning_rate"] == 0.005 and run["config"]["rank"] == 4
    logged = {}
    for row in run["history"]:
        logged.setdefault(row["_step"], {}).update(row)
    assert sorted(logged) == [0, 1, 2, 3, 4, 5, 6]   # step 0: the grid before training
    for step, row in logged.items():
        if step:
            assert row["loss"] == pytest.approx(metrics[step - 1]["loss"])
            assert {"lr", "grad_norm", "step_time_s", "samples_per_s", "peak_memory_gb"} <= set(row)
    assert [s for s, row in logged.items() if row.get("validation/_type") == "image-file"] == [0, 3, 6]
    assert logged[6]["val_psnr"] == pytest.approx(metrics[-1]["val_psnr"])
    assert (out / "wandb_run_id.txt").is_file()


def test_schedule_free_previews_use_the_averaged_weights(cache_with_validation, resize, tmp_path, monkeypatch):
    """The DiT that samples the last preview carries exactly the LoRA that is written at the end (the average)."""
    import edittuner.trainer as trainer_module

    seen = []
    original = trainer_module.sample_edit_latents

    def recording(dit, *args, **kwargs):
        seen.append({k: v.clone() for k, v in lora_state_dict(dit, 4, 4.0).items()})   # not views of the weights
        return original(dit, *args, **kwargs)

    monkeypatch.setattr(trainer_module, "sample_edit_latents", recording)
    out = tmp_path / "sf"
    train(_cfg(cache_with_validation, resize, out, optimizer="prodigy_sf", learning_rate=None, objective="lbm",
               report_to="none"), progress=False)
    from safetensors.torch import load_file
    final = load_file(out / "lora.safetensors")
    last = seen[-1]
    # eval() again for the final file rounds differently in the last bits (measured 1.6e-6 on weights of ~0.2).
    assert all(torch.allclose(last[k], final[k], atol=1e-5) for k in final)
    # ...and not the training view, which differs from the average under schedule-free.
    assert len(seen) == 6  # 2 pairs x 3 previews (steps 0, 3, 6), bridge sampler for lbm


def test_validation_flags_and_report_to(demo_cache, resize, tmp_path, monkeypatch):
    with pytest.raises(EditTunerError, match="no validation pairs"):
        train(_cfg(demo_cache, resize, tmp_path / "r"), progress=False)
    with pytest.raises(EditTunerError, match="--validation_inference_steps"):
        _cfg(demo_cache, resize, tmp_path / "r", validation_inference_steps=0)
    with pytest.raises(EditTunerError, match="--report_to"):
        _cfg(demo_cache, resize, tmp_path / "r", report_to="tensorboard")
    monkeypatch.delenv("WANDB_MODE", raising=False)
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert resolve_report_to("auto") == "none"
    monkeypatch.setenv("WANDB_MODE", "offline")
    assert resolve_report_to("auto") == "wandb" and resolve_report_to("none") == "none"
    # No validation cache and no flag: no previews, no error.
    train(_cfg(demo_cache, resize, tmp_path / "plain", validation_steps=None, max_steps=2, report_to="none"),
          progress=False)
    assert not (tmp_path / "plain/validation").exists()


def test_previews_sample_with_the_runs_zero_cond_t_not_the_presets(cache_with_validation, resize, tmp_path,
                                                                   monkeypatch):
    """--model_version 2511 --zero_cond_t off trains without zero_cond_t; each preview equals sampling with it off
    (and differs from sampling with the preset's on)."""
    import edittuner.trainer as trainer_module

    original = trainer_module.sample_edit_latents
    compared = []

    def comparing(dit, sample, sampler, model, device, dtype, *args, **kwargs):
        preview = original(dit, sample, sampler, model, device, dtype, *args, **kwargs)
        off, on = (original(dit, sample, sampler, dataclasses.replace(model, zero_cond_t=z), device, dtype, *args,
                            **kwargs) for z in (False, True))
        compared.append((torch.equal(preview, off), torch.equal(preview, on)))
        return preview

    monkeypatch.setattr(trainer_module, "sample_edit_latents", comparing)
    cfg = _cfg(cache_with_validation, resize, tmp_path / "off", model_version="2511", zero_cond_t=False, max_steps=3,
               report_to="none", validation_at_start=False)
    assert cfg.zero_cond_t is False
    train(cfg, progress=False)
    assert compared == [(True, False)] * 2   # one preview at step 3, two pairs


def test_ema_previews_and_their_metrics_against_the_dataset_pixels(cache_with_validation, demo_dir, resize, tmp_path,
                                                                   monkeypatch):
    """With --ema_decay the previews sample the EMA (the checkpoint's lora_ema at that step), training goes on from
    the training weights exactly (the same LoRA as a run without previews), and the edit metrics compare each output
    with the dataset's target pixels (sized as phase 1 sized them) and its mask."""
    import numpy as np

    import edittuner.trainer as trainer_module
    from edittuner.dataset import load_dataset
    from edittuner.images import load_rgb, resize_to

    seen, targets = [], []
    original_sample, original_metrics = trainer_module.sample_edit_latents, trainer_module.edit_metrics

    def recording(dit, *args, **kwargs):
        seen.append({k: v.clone() for k, v in lora_state_dict(dit, 4, 4.0).items()})   # not views of the weights
        return original_sample(dit, *args, **kwargs)

    def scoring(output, target, mask):
        targets.append((np.asarray(target), mask))
        return original_metrics(output, target, mask)

    monkeypatch.setattr(trainer_module, "sample_edit_latents", recording)
    monkeypatch.setattr(trainer_module, "edit_metrics", scoring)
    kw = dict(max_steps=6, save_every=3, report_to="none", ema_decay=0.5, validation_inference_steps=1)
    with_previews = tmp_path / "ema"
    train(_cfg(cache_with_validation, resize, with_previews, **kw), progress=False)
    from safetensors.torch import load_file
    ema_3 = load_file(with_previews / "checkpoints/step-3/lora_ema.safetensors")
    assert len(seen) == 6 and all(torch.equal(seen[2][k], ema_3[k]) for k in ema_3)   # step 3's two pairs
    assert all(torch.equal(seen[-1][k], v) for k, v in load_file(with_previews / "lora_ema.safetensors").items())
    assert not all(torch.equal(seen[2][k], v) for k, v in load_file(with_previews / "checkpoints/step-3/"
                                                                     "lora.safetensors").items())
    plain = tmp_path / "plain"
    train(_cfg(cache_with_validation, resize, plain, **{**kw, "validation_steps": 0}), progress=False)
    a, b = load_file(with_previews / "lora.safetensors"), load_file(plain / "lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    rows = load_dataset(demo_dir / "dataset_val.json")
    for (target, mask), row in zip(targets[:2], rows):
        image = load_rgb(row.image)
        assert np.array_equal(target, np.asarray(resize_to(image, (target.shape[1], target.shape[0]))))
        assert mask is not None and mask.size == (target.shape[1], target.shape[0])
