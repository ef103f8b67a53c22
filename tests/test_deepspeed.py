"""DeepSpeed ZeRO-3 on CPU over gloo, driven directly (edittuner/distributed.py), on 2 ranks."""

import json
from pathlib import Path
import socket
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from edittuner.errors import EditTunerError
from edittuner.tracking import read_metrics
from edittuner.checkpoint import load_state
from edittuner.configs import ProdigyConfig
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
    # 2% of one lr-5e-3 AdamW step: Adam normalises each element, so an element whose gradient is rounding noise
    # turns last-bit differences into a fraction of a step (measured 2e-5 on the fitted 128-wide tiny DiT).
    assert max(float((zero3[k] - ref[k]).abs().max()) for k in ref) < 1e-4
    # The EMA is of the gathered LoRA: the same average as one process keeps.
    zero3_ema, ref_ema = load_file(tmp_path / "zero3/lora_ema.safetensors"), load_file(single / "lora_ema.safetensors")
    assert max(float((zero3_ema[k] - ref_ema[k]).abs().max()) for k in ref) < 1e-4   # the average of LoRAs within that bound
    assert not all(torch.equal(zero3[k], load_file(tmp_path / "zero3/checkpoints/step-2/lora.safetensors")[k])
                   for k in zero3)  # the checkpoint is the gathered LoRA of step 2, not a placeholder
    got, want = read_metrics(tmp_path / "zero3/metrics.jsonl"), read_metrics(single / "metrics.jsonl")
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in want], rel=1e-5)
    assert [m["grad_norm"] for m in got] == pytest.approx([m["grad_norm"] for m in want], rel=1e-4)
    config = json.loads((tmp_path / "zero3/config.json").read_text())
    assert config["resolved"]["processes"] == 2


def test_zero3_prodigy_has_one_d_and_resumes_exactly(demo_cache, resize, tmp_path):
    """Prodigy on 2 ZeRO-3 ranks (each holding half of every LoRA matrix) follows 1 process with doubled
    accumulation: one d, bitwise the same on both ranks, and the d of 1 process each step within rel 5e-3 (see the
    test below: the numerator's terms cancel, so the order of its sums shows at ~1e-3); losses within the AdamW
    test's rel 1e-5; the LoRA (checkpoint and final, the averaged weights, gathered) within 1e-3, not AdamW's 1e-5:
    lora_A takes its first steps on near-zero gradients (lora_B starts at zero), where Prodigy's normalised steps
    (eps scaled by d) act like sign steps and turn last-bit differences into whole steps of d0 = 1e-3; measured
    2e-4 to 5e-4. A stopped run resumes bitwise."""
    # d_coef 10: on the fitted tiny base d would stay at d0 for 7 steps; here it moves at step 4 (d 3.3e-3).
    prodigy = ["--optimizer", "prodigy_sf", "--prodigy_d0", 1e-3, "--prodigy_d_coef", 10, "--prodigy_factored", "off"]
    common = ["--cache_dir", demo_cache, "--deepspeed_config", ZERO3, "--rank", 4, "--max_pixels", TINY_PIXELS,
              "--eval_samples", 0, "--report_to", "none", "--save_every", 2, "--gradient_accumulation", 1,
              "--gradient_checkpointing", "off", *prodigy]
    whole, part = tmp_path / "whole", tmp_path / "part"
    runs = [_torchrun("train", "--output_dir", whole, "--max_steps", 4, *common),
            _torchrun("train", "--output_dir", part, "--max_steps", 2, *common)]
    assert all(r.returncode == 0 for r in runs), [r.stderr[-2000:] for r in runs]
    resumed = _torchrun("train", "--output_dir", part, "--max_steps", 4, "--resume", "latest", *common)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    single = tmp_path / "single"
    train(TrainConfig(cache_dir=demo_cache, output_dir=single, resize=resize, max_steps=4, rank=4, save_every=2,
                      gradient_accumulation=2, eval_samples=0, report_to="none", gradient_checkpointing=False,
                      optimizer="prodigy_sf", prodigy=ProdigyConfig(d0=1e-3, d_coef=10.0, factored=False)),
          progress=False)
    got, want = read_metrics(whole / "metrics.jsonl"), read_metrics(single / "metrics.jsonl")
    shards = [load_state(whole / "checkpoints/step-4", f"optimizer.rank{r}")["optimizer_state_dict"] for r in (0, 1)]
    assert shards[0]["param_groups"][0]["d"] == shards[1]["param_groups"][0]["d"] == got[-1]["d"]
    assert [m["d"] for m in got] == pytest.approx([m["d"] for m in want], rel=5e-3)
    assert want[-1]["d"] > 1.1e-3   # d moved off d0 (the comparison is not of constants)
    assert [m["loss"] for m in got] == pytest.approx([m["loss"] for m in want], rel=1e-5)
    # One step of d at that point: a near-zero gradient element's sign step may differ (see above).
    for step, tolerance in (("checkpoints/step-2/lora.safetensors", want[1]["d"]), ("lora.safetensors", want[-1]["d"])):
        zero3, ref = load_file(whole / step), load_file(single / step)   # the averaged LoRA, gathered
        assert zero3.keys() == ref.keys()
        assert max(float((zero3[k] - ref[k]).abs().max()) for k in ref) < tolerance
        assert max(float(ref[k].abs().max()) for k in ref if "lora_B" in k) > 5e-3   # B trained off zero
    a, b = load_file(whole / "lora.safetensors"), load_file(part / "lora.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [(m["loss"], m["d"]) for m in read_metrics(part / "metrics.jsonl")] == [(m["loss"], m["d"]) for m in got]


def test_zero3_refuses_bad_configs(demo_cache, tmp_path):
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
    check_launch(phase_1, phase_2, ROOT / "accelerate_configs/zero3.yaml")   # Prodigy runs under ZeRO-3 (one d)
    phase_2.deepspeed_config, phase_2.batch_size = None, 2
    with pytest.raises(EditTunerError, match="--batch_size 2 under DeepSpeed ZeRO"):
        check_launch(phase_1, phase_2, ROOT / "accelerate_configs/zero3.yaml")
    assert not (tmp_path / "cache").exists() and not (tmp_path / "run").exists()


def _partitioned_prodigy(rank: int, port: int, out: str) -> None:
    """One of 2 ranks: GlobalProdigy on this rank's ZeRO-3-style partition (every parameter split in two, padded,
    the shares of all parameters in one flat tensor) beside the package's per-parameter optimizer on the whole
    parameters, the same gradients each step."""
    import math
    import types
    import torch.distributed as dist
    from edittuner.prodigy import GlobalProdigy
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    shapes = [(4, 63), (33, 4), (4, 16), (16, 4)]   # odd sizes: the last rank's shares are padded
    init = [torch.randn(s, generator=torch.Generator().manual_seed(i)) * 0.1 for i, s in enumerate(shapes)]

    def share(t):
        half = math.ceil(t.numel() / 2)
        return torch.cat([t.flatten(), t.new_zeros(2 * half - t.numel())])[rank * half:(rank + 1) * half]
    # d_limiter off: d follows Prodigy's estimate d_hat itself, not the limiter's fixed growth.
    settings = dict(lr=1.0, d0=1e-3, factored=False, weight_decay=0.01, d_limiter=False)
    whole = [torch.nn.Parameter(t.clone()) for t in init]
    reference = GlobalProdigy(whole, **settings)
    flat = torch.nn.Parameter(torch.cat([share(t) for t in init]))
    partitioned = GlobalProdigy([flat], **settings)
    layout = [types.SimpleNamespace(ds_numel=t.numel(), ds_tensor=types.SimpleNamespace(ds_numel=math.ceil(t.numel() / 2)))
              for t in init]
    partitioned.bind_zero(types.SimpleNamespace(fp16_groups=[layout], fp32_partitioned_groups_flat=[flat],
                                                dp_process_group=None))
    record = []
    for step in range(5):
        grads = [torch.randn(s, generator=torch.Generator().manual_seed(99 + i)) +
                 0.3 * torch.randn(s, generator=torch.Generator().manual_seed(1000 * step + i)) for i, s in enumerate(shapes)]
        for p, g in zip(whole, grads):
            p.grad = g.clone()
        flat.grad = torch.cat([share(g) for g in grads])
        reference.step()
        partitioned.step()
        gap = float((torch.cat([share(p.detach()) for p in whole]) - flat.detach()).abs().max())
        record.append([reference.param_groups[0]["d"], partitioned.param_groups[0]["d"], gap])
    Path(out, f"rank{rank}.json").write_text(json.dumps(record))


def test_global_prodigy_on_two_partitions_is_the_per_parameter_optimizer(tmp_path):
    """The math alone, without DeepSpeed (fast): on 2 gloo ranks, each holding half of every parameter in one flat
    partition, GlobalProdigy's d and weights equal the package's per-parameter optimizer on the whole parameters
    (d within rel 1e-2, weights of ~0.1 within 1e-4: Prodigy's numerator sums dot(grad, p0 - p) over terms that cancel
    heavily, so summing per partition instead of per parameter moves d_hat by up to 2e-3 relative here, and the
    steps follow d; measured 2e-3 and 6e-5 over 5 steps), and the d of both ranks is bitwise one."""
    import torch.multiprocessing as mp
    mp.spawn(_partitioned_prodigy, args=(_free_port(), str(tmp_path)), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [[d for _, d, _ in r] for r in ranks][0] == [d for _, d, _ in ranks[1]]   # one d on both ranks
    for reference, partitioned, gap in ranks[0] + ranks[1]:
        assert partitioned == pytest.approx(reference, rel=1e-2) and gap < 1e-4
    assert ranks[0][-1][0] > 2e-3   # d moved off d0 = 1e-3
