"""Long-run safety: a NaN loss stops the run naming step and sample and keeps the last good checkpoint;
--keep_last prunes old checkpoints."""

import pytest
import torch
from safetensors.torch import load_file

from edittuner.errors import EditTunerError
from edittuner.trainer import TrainConfig, train


def _cfg(cache, resize, out, **kw):
    base = dict(cache_dir=cache, output_dir=out, resize=resize, max_steps=6, learning_rate=5e-3, rank=4,
                gradient_accumulation=1, gradient_checkpointing=False, eval_samples=0, report_to="none", save_every=2)
    return TrainConfig(**{**base, **kw})


def test_nan_loss_stops_with_step_and_sample_and_keeps_the_last_checkpoint(demo_cache, resize, tmp_path, monkeypatch):
    from edittuner.objectives import FlowMatching

    calls = {"n": 0}
    original = FlowMatching.losses

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        losses = original(self, *args, **kwargs)
        return losses * float("nan") if calls["n"] == 5 else losses  # the 5th batch of one: step 5

    monkeypatch.setattr(FlowMatching, "losses", poisoned)
    out = tmp_path / "run"
    with pytest.raises(EditTunerError, match=r"step 5: loss is nan on sample \w+.*last checkpoint is kept"):
        train(_cfg(demo_cache, resize, out), progress=False)
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == ["step-2", "step-4"]
    assert all(torch.isfinite(v).all() for v in load_file(out / "checkpoints/step-4/lora.safetensors").values())
    assert not (out / "lora.safetensors").exists()


def test_keep_last_prunes_old_checkpoints(demo_cache, resize, tmp_path):
    out = tmp_path / "run"
    train(_cfg(demo_cache, resize, out, keep_last=2, save_every=1), progress=False)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-5", "step-6"]
