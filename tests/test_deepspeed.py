"""DeepSpeed ZeRO-3 on CPU over gloo, driven directly (edittuner/distributed.py), on 2 ranks."""

import json
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from edittuner.errors import EditTunerError
from edittuner.tracking import read_metrics
from edittuner.trainer import TrainConfig, train

from conftest import ROOT, TINY_PIXELS

ZERO3 = ROOT / "accelerate_configs/zero3.json"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _torchrun(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                           "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m", "edittuner",
                           *map(str, args)], capture_output=True, text=True, cwd=ROOT, timeout=timeout)


def test_zero3_on_two_ranks_equals_one_process_with_doubled_accumulation(demo_cache, resize, tmp_path):
    common = ["--max_steps", 4, "--learning_rate", 5e-3, "--rank", 4, "--max_pixels", TINY_PIXELS,
              "--eval_samples", 0, "--report_to", "none", "--save_every", 2, "--gradient_checkpointing", "off",
              "--ema_decay", 0.5]
    result = _torchrun("train", "--cache_dir", demo_cache, "--output_dir", tmp_path / "zero3", "--deepspeed_config",
                       ZERO3, "--gradient_accumulation", 1, *common)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("phase 2: 4 steps") == 1  # one summary line, from rank 0
    single = tmp_path / "single"
    train(TrainConfig(cache_dir=demo_cache, output_dir=single, resize=resize, max_steps=4, learning_rate=5e-3, rank=4,
                      gradient_accumulation=2, eval_samples=0, report_to="none", save_every=2,
                      gradient_checkpointing=False, ema_decay=0.5), progress=False)
    # Same samples in the same order (position = (step * ga + micro) * world + rank), same noise: same LoRA.
    zero3, ref = load_file(tmp_path / "zero3/lora.safetensors"), load_file(single / "lora.safetensors")
    assert zero3.keys() == ref.keys()
    assert max(float((zero3[k] - ref[k]).abs().max()) for k in ref) < 1e-5
    # The EMA is of the gathered LoRA: the same average as one process keeps.
    zero3_ema, ref_ema = load_file(tmp_path / "zero3/lora_ema.safetensors"), load_file(single / "lora_ema.safetensors")
    assert max(float((zero3_ema[k] - ref_ema[k]).abs().max()) for k in ref) < 1e-5
    assert not all(torch.equal(zero3[k], load_file(tmp_path / "zero3/checkpoints/step-2/lora.safetensors")[k])
                   for k in zero3)  # the checkpoint is the gathered LoRA of step 2, not a placeholder
    got, want = read_metrics(tmp_path / "zero3/metrics.jsonl"), read_metrics(single / "metrics.jsonl")
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in want], rel=1e-5)
    assert [m["grad_norm"] for m in got] == pytest.approx([m["grad_norm"] for m in want], rel=1e-4)
    config = json.loads((tmp_path / "zero3/config.json").read_text())
    assert config["resolved"]["processes"] == 2


def test_zero3_refuses_prodigy_and_bad_configs(demo_cache, tmp_path):
    with pytest.raises(EditTunerError, match="d would drift apart across ranks"):
        train(TrainConfig(cache_dir=demo_cache, output_dir=tmp_path / "p", optimizer="prodigy_sf",
                          deepspeed_config=ZERO3, max_steps=1), progress=False)
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(EditTunerError, match="cannot read it as JSON"):
        train(TrainConfig(cache_dir=demo_cache, output_dir=tmp_path / "b", deepspeed_config=bad, max_steps=1),
              progress=False)
    stage2 = tmp_path / "stage2.json"
    stage2.write_text(json.dumps({"zero_optimization": {"stage": 2}}))
    with pytest.raises(EditTunerError, match="stage must be 3"):
        train(TrainConfig(cache_dir=demo_cache, output_dir=tmp_path / "s", deepspeed_config=stage2, max_steps=1),
              progress=False)


def test_zero3_resume_from_per_rank_shards_is_exact(demo_cache, resize, tmp_path):
    common = ["--cache_dir", demo_cache, "--deepspeed_config", ZERO3, "--learning_rate", 5e-3, "--rank", 4,
              "--max_pixels", TINY_PIXELS, "--eval_samples", 0, "--report_to", "none", "--save_every", 3,
              "--gradient_accumulation", 1, "--gradient_checkpointing", "off", "--warmup_steps", 4,
              "--ema_decay", 0.5]
    whole, part = tmp_path / "whole", tmp_path / "part"
    runs = [_torchrun("train", "--output_dir", whole, "--max_steps", 6, *common),
            _torchrun("train", "--output_dir", part, "--max_steps", 3, *common)]
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    assert sorted(p.name for p in (part / "checkpoints/step-3").glob("optimizer.rank*.safetensors")) == \
        ["optimizer.rank0.safetensors", "optimizer.rank1.safetensors"]
    assert not list((part / "checkpoints").glob(".*"))  # no staging folder left behind
    resumed = _torchrun("train", "--output_dir", part, "--max_steps", 6, "--resume", "latest", *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for name in ("lora.safetensors", "lora_ema.safetensors"):
        a, b = load_file(whole / name), load_file(part / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
    got, want = read_metrics(part / "metrics.jsonl"), read_metrics(whole / "metrics.jsonl")
    assert [(m["loss"], m["lr"], m["grad_norm"]) for m in got] == [(m["loss"], m["lr"], m["grad_norm"]) for m in want]
    # A ZeRO checkpoint resumed without ZeRO is refused, naming how it was written.
    with pytest.raises(EditTunerError, match="written under DeepSpeed ZeRO with 2 processes"):
        train(TrainConfig(cache_dir=demo_cache, output_dir=part, resize=resize, max_steps=8, resume="latest", rank=4,
                          gradient_accumulation=1), progress=False)


def test_launcher_with_the_zero3_accelerate_config_runs_both_phases_on_two_processes(demo_dir, tmp_path):
    """ACCELERATE_CONFIG=zero3.yaml, NUM_PROCESSES=2: accelerate launches, phase 1 shards, phase 2 runs ZeRO-3
    (driven by edittuner from the env accelerate exports) and writes one optimizer shard per rank."""
    import os
    import shutil
    shutil.copytree(demo_dir, tmp_path / "demo")
    env = {**os.environ, "ACCELERATE_CONFIG": "accelerate_configs/zero3.yaml", "NUM_PROCESSES": "2", "STEPS": "2",
           "SAVE_EVERY": "2", "DATASET_JSON": str(tmp_path / "demo/dataset.json"), "CACHE_DIR": str(tmp_path / "cache"),
           "OUTPUT_DIR": str(tmp_path / "run"), "VALIDATION_STEPS": "0"}
    result = subprocess.run(["bash", str(ROOT / "Qwen-Image-Edit-2511.sh")], capture_output=True, text=True, cwd=ROOT,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("phase 1: encoded") == 1 and result.stdout.count("phase 2: 2 steps") == 1
    step = tmp_path / "run/checkpoints/step-2"
    assert json.loads((step / "trainer_state.json").read_text())["zero_stage"] == 3
    assert sorted(p.name for p in step.glob("optimizer.rank*.safetensors")) == \
        ["optimizer.rank0.safetensors", "optimizer.rank1.safetensors"]


def test_the_check_reads_the_accelerate_config_as_the_workers_will(demo_dir, resize, tmp_path, monkeypatch):
    """`edittuner check` (the launchers' first step) checks phase 2 under the DeepSpeed JSON an accelerate config
    names, so what ZeRO refuses is refused before phase 1, and leaves no folder behind."""
    from edittuner.cache import PrecomputeConfig
    from edittuner.launch import deepspeed_config_file
    from edittuner.models import ModelSource
    from edittuner.preflight import check_launch
    monkeypatch.chdir(ROOT)   # the JSON's path is relative to where accelerate is launched, as the launchers do
    assert deepspeed_config_file(ROOT / "accelerate_configs/single.yaml") is None
    assert deepspeed_config_file(ROOT / "accelerate_configs/zero3.yaml") == ZERO3.relative_to(ROOT)
    (tmp_path / "inline.yaml").write_text("distributed_type: DEEPSPEED\ndeepspeed_config:\n  zero_stage: 3\n")
    with pytest.raises(EditTunerError, match="without deepspeed_config.deepspeed_config_file"):
        deepspeed_config_file(tmp_path / "inline.yaml")
    (tmp_path / "list.yaml").write_text("- a\n")
    with pytest.raises(EditTunerError, match="expected a mapping"):
        deepspeed_config_file(tmp_path / "list.yaml")
    phase_1 = PrecomputeConfig(dataset_json=demo_dir / "dataset.json", cache_dir=tmp_path / "cache",
                               model=ModelSource(), resize=resize)
    phase_2 = TrainConfig(cache_dir=tmp_path / "cache", output_dir=tmp_path / "run", resize=resize,
                          optimizer="prodigy_sf")
    check_launch(phase_1, phase_2, ROOT / "accelerate_configs/ddp.yaml")
    phase_2.deepspeed_config = None
    with pytest.raises(EditTunerError, match="prodigy_sf with DeepSpeed ZeRO stage 3"):
        check_launch(phase_1, phase_2, ROOT / "accelerate_configs/zero3.yaml")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()
