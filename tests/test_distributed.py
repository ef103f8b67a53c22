"""Multi-process behaviour on CPU (gloo): phase-1 sharding, DDP equivalence, Prodigy's d across ranks, and exact
resume after a hard kill. Every run is a subprocess with a timeout; 2-process runs go through
`accelerate launch` with the launcher's DDP config, each on a free port so that xdist workers never collide.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from edittuner.cache import sha256_file

from conftest import ROOT, TINY_PIXELS

# Each test here already runs 2 processes on a 2-core machine: keep them on one xdist worker
# (effective with `pytest -n 2 --dist loadgroup`; with plain `-n 2` they are just short).
pytestmark = pytest.mark.xdist_group("distributed")

TIMEOUT = 300
ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1"}

# Run inside each launched process: records what this rank did, then runs the `edittuner` CLI unchanged.
#   ET_RECORD_DIR   where to write encoded-rank<R>.json (phase-1 sample ids this rank wrote) and
#                   d-rank<R>.json (ProdigyPlusScheduleFree's d after every optimizer step)
#   ET_CPU_STATE=1  initialise accelerate's PartialState with cpu=True first (what phase 2's Accelerator does)
DRIVER = r'''
import json, os, sys
import torch
from torch.optim.optimizer import register_optimizer_step_post_hook

if os.environ.get("ET_CPU_STATE") == "1":
    from accelerate import PartialState
    PartialState(cpu=not torch.cuda.is_available())

import edittuner.cache as cache
from edittuner.cli import main

record_dir = os.environ["ET_RECORD_DIR"]
rank = int(os.environ.get("RANK", "0"))
encoded, d_values = [], []
_save_file = cache.save_file


def recording_save_file(tensors, path, metadata=None):
    if metadata and "record" in metadata:
        encoded.append(json.loads(metadata["record"])["id"])
    return _save_file(tensors, path, metadata=metadata)


def record_d(optimizer, args, kwargs):
    group = optimizer.param_groups[0]
    if "d" in group:
        d_values.append(float(group["d"]))


cache.save_file = recording_save_file
register_optimizer_step_post_hook(record_d)
try:
    code = main(sys.argv[1:])
finally:
    with open(os.path.join(record_dir, f"encoded-rank{rank}.json"), "w") as f:
        json.dump(encoded, f)
    with open(os.path.join(record_dir, f"d-rank{rank}.json"), "w") as f:
        json.dump(d_values, f)
sys.exit(code)
'''


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(nproc: int, script: list[str]) -> list[str]:
    if nproc == 1:
        return [sys.executable, *script]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "accelerate_configs/ddp.yaml"), "--num_processes", str(nproc),
            "--main_process_port", str(_free_port()), *script]


def _start(nproc: int, args, tmp_path: Path, driver: bool = False, env: dict | None = None, **popen):
    """Start `edittuner <args>` on ``nproc`` processes (through the recording driver when asked)."""
    if driver:
        path = tmp_path / "driver.py"
        path.write_text(DRIVER)
        script = [str(path)]
    else:
        script = ["-m", "edittuner"]
    popen = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, **popen}
    return subprocess.Popen(_command(nproc, [*script, *map(str, args)]), cwd=ROOT, text=True,
                            env={**os.environ, **ENV, **(env or {})}, **popen)


def _finish(proc: subprocess.Popen) -> str:
    """Wait for a run started by _start; its stdout. Kills it (and fails) past TIMEOUT."""
    try:
        stdout, stderr = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        raise
    assert proc.returncode == 0, (stdout[-2000:], stderr[-4000:])
    return stdout


def _run_all(*runs) -> list[str]:
    """Run several (nproc, args, tmp_path, kwargs) at once: process start-up dominates these tiny runs."""
    procs = [_start(nproc, args, folder, **kwargs) for nproc, args, folder, kwargs in runs]
    try:
        return [_finish(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def _train_args(cache: Path, out: Path, *extra) -> list:
    return ["train", "--cache_dir", cache, "--output_dir", out, "--max_pixels", TINY_PIXELS, "--rank", 4,
            "--gradient_checkpointing", "off", "--eval_samples", 0, "--report_to", "none", "--validation_steps", 0,
            "--seed", 0, *extra]


def _assert_same_cache(reference: Path, other: Path):
    """Same manifest records and bitwise-equal tensors. File bytes may differ: safetensors writes its metadata
    keys in hash-map order, which varies between processes, so each cache's file_sha256 is checked on its own."""
    a = json.loads((reference / "manifest.json").read_text())
    b = json.loads((other / "manifest.json").read_text())
    for cache, manifest in ((reference, a), (other, b)):
        for record in manifest["samples"]:
            if "file_sha256" in record:   # the sha256 of the bytes this cache holds, from whichever rank wrote it
                assert sha256_file(cache / record["file"]) == record["file_sha256"], (cache, record["id"])
    strip = lambda records: [{k: v for k, v in r.items() if k != "file_sha256"} for r in records]  # noqa: E731
    assert strip(a["samples"]) == strip(b["samples"])  # ids, files, sources, hashes, shapes, in dataset order
    assert a["identity"] == b["identity"] and a["dtype"] == b["dtype"]
    assert json.loads((reference / "cache_identity.json").read_text()) == \
        json.loads((other / "cache_identity.json").read_text())
    # no stray, temporary or per-rank files
    assert sorted(p.name for p in reference.iterdir()) == sorted(p.name for p in other.iterdir())
    files = sorted(p.name for p in (reference / "samples").iterdir())
    assert files == sorted(p.name for p in (other / "samples").iterdir())
    assert [r["file"] for r in a["samples"]] and len(files) == len(a["samples"])
    for name in files:
        x, y = load_file(reference / "samples" / name), load_file(other / "samples" / name)
        assert x.keys() == y.keys(), name
        for key in x:
            assert x[key].dtype == y[key].dtype and torch.equal(x[key], y[key]), (name, key)
        with safe_open(str(reference / "samples" / name), "pt") as f, safe_open(str(other / "samples" / name), "pt") as g:
            assert f.metadata() == g.metadata(), name


def _precompute_args(dataset: Path, cache: Path) -> list:
    return ["precompute", "--dataset_json", dataset, "--cache_dir", cache, "--max_pixels", TINY_PIXELS]


def _dirs(tmp_path: Path, *names) -> list[Path]:
    for name in names:
        (tmp_path / name).mkdir()
    return [tmp_path / name for name in names]


def test_phase1_on_two_processes_shards_and_equals_one_process_cache(demo_dir, tmp_path):
    """Each sample is encoded by exactly one of 2 processes, rank 0 writes one manifest after the barrier, and
    the merged cache is the 1-process cache (records, tensors bit for bit)."""
    dataset = demo_dir / "dataset.json"
    ids = [row["id"] for row in json.loads(dataset.read_text())]
    one, two = _dirs(tmp_path, "one", "two")
    _, stdout = _run_all(
        (1, _precompute_args(dataset, tmp_path / "cache1"), one, {"driver": True, "env": {"ET_RECORD_DIR": str(one)}}),
        (2, _precompute_args(dataset, tmp_path / "cache2"), two,
         {"driver": True, "env": {"ET_RECORD_DIR": str(two), "ET_CPU_STATE": "1"}}))
    per_rank = [json.loads((two / f"encoded-rank{r}.json").read_text()) for r in (0, 1)]
    assert all(per_rank), per_rank
    assert sorted(per_rank[0] + per_rank[1]) == sorted(ids)          # no gaps, no duplicates
    assert not set(per_rank[0]) & set(per_rank[1])
    assert abs(len(per_rank[0]) - len(per_rank[1])) <= 1
    assert stdout.count("phase 1: encoded") == 1, stdout   # only the main process reports
    _assert_same_cache(tmp_path / "cache1", tmp_path / "cache2")


def test_precompute_cli_shards_on_cpu_without_help(demo_dir, tmp_path):
    """The plain CLI under `accelerate launch` (what scripts/launch.sh runs) shards phase 1 by itself."""
    _run_all((2, _precompute_args(demo_dir / "dataset.json", tmp_path / "cache"), tmp_path,
              {"driver": True, "env": {"ET_RECORD_DIR": str(tmp_path)}}))
    per_rank = [json.loads((tmp_path / f"encoded-rank{r}.json").read_text()) for r in (0, 1)]
    assert not set(per_rank[0]) & set(per_rank[1]), per_rank


@pytest.mark.parametrize("version, cache_fixture", [("2511", "demo_cache"), ("longcat", "longcat_cache")])
def test_ddp_two_processes_equal_one_process_with_double_accumulation(version, cache_fixture, request, tmp_path):
    """2 processes x accumulation 1 see the same samples and noise per step as 1 process x accumulation 2: same
    LoRA, and the logged loss (mean over processes) equals the 1-process mean over micro-batches. For both
    families: LongCat's transformer (diffusers) under DDP goes through the same trainer."""
    cache = request.getfixturevalue(cache_fixture)
    common = ["--max_steps", 6, "--learning_rate", 5e-3, "--optimizer", "adamw", "--save_every", 1000,
              "--model_version", version]
    _run_all((1, _train_args(cache, tmp_path / "one", *common, "--gradient_accumulation", 2), tmp_path, {}),
             (2, _train_args(cache, tmp_path / "two", *common, "--gradient_accumulation", 1), tmp_path, {}))
    config = json.loads((tmp_path / "two/config.json").read_text())
    assert config["resolved"]["processes"] == 2 and config["model_version"] == version
    assert json.loads((tmp_path / "one/config.json").read_text())["resolved"]["processes"] == 1
    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert [m["step"] for m in two] == list(range(1, 7))              # one log, written by the main process
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7), (a, b)
        assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5, abs=1e-7), (a, b)
        assert b["lr"] == a["lr"]
    # the loss varies from step to step: equality above is not a coincidence of constant values
    assert len({round(m["loss"], 6) for m in one}) > 1
    a, b = load_file(tmp_path / "one/lora.safetensors"), load_file(tmp_path / "two/lora.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)
    assert any(a[k].abs().max() > 1e-4 for k in a if "lora_B" in k)  # training moved lora_B off zero


def test_prodigy_sf_step_size_is_identical_on_every_rank(demo_cache, tmp_path):
    """ProdigyPlusScheduleFree estimates d from gradients and weights; under DDP every rank must get the same d
    (bitwise) after every step, or the replicas drift apart. It also matches 1 process x accumulation 2."""
    # d_coef 10: on the fitted tiny base d would stay at d0 for 7 steps at the default 1 (measured); here from step 4.
    common = ["--max_steps", 6, "--optimizer", "prodigy_sf", "--prodigy_d_coef", 10, "--save_every", 1000]
    one, two = _dirs(tmp_path, "one", "two")
    _run_all((2, _train_args(demo_cache, tmp_path / "run2", *common, "--gradient_accumulation", 1), two,
              {"driver": True, "env": {"ET_RECORD_DIR": str(two)}}),
             (1, _train_args(demo_cache, tmp_path / "run1", *common, "--gradient_accumulation", 2), one,
              {"driver": True, "env": {"ET_RECORD_DIR": str(one)}}))
    d0, d1 = (json.loads((two / f"d-rank{r}.json").read_text()) for r in (0, 1))
    assert len(d0) == 6 and d0 == d1, (d0, d1)
    assert d0[-1] > d0[0], d0                                      # d adapted (it starts at d0 = 1e-6)
    assert [m["d"] for m in _metrics(tmp_path / "run2")] == d0        # what the main process logs
    single = json.loads((one / "d-rank0.json").read_text())
    assert single == pytest.approx(d0, rel=1e-4), (single, d0)


def test_sigkill_mid_run_then_resume_latest_equals_an_uninterrupted_run(demo_cache, tmp_path):
    """A hard kill (no chance to checkpoint) mid-run, then `--resume latest` to the end: per-step loss, lr and
    grad_norm and the final LoRA are bitwise those of an uninterrupted run (fp32, CPU)."""
    steps = 32
    common = ["--max_steps", steps, "--learning_rate", 5e-3, "--gradient_accumulation", 2, "--save_every", 5,
              "--warmup_steps", 8]
    reference, out = tmp_path / "reference", tmp_path / "killed"
    uninterrupted = _start(1, _train_args(demo_cache, reference, *common), tmp_path)   # runs beside the kill
    proc = _start(1, _train_args(demo_cache, out, *common), tmp_path, stdout=subprocess.DEVNULL)
    try:
        deadline = time.time() + TIMEOUT
        while time.time() < deadline and proc.poll() is None:
            if (out / "checkpoints/step-10/trainer_state.json").exists() and (out / "metrics.jsonl").exists() \
                    and len((out / "metrics.jsonl").read_text().splitlines()) >= 12:
                break
            time.sleep(0.005)
        assert proc.poll() is None, f"the run ended before it could be killed: {proc.stderr.read()[-2000:]}"
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        proc.wait(timeout=60)
        proc.stderr.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "lora.safetensors").exists()
    logged = len(_metrics(out))
    kept = sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))
    assert kept and 10 <= kept[-1] < steps and logged < steps, (kept, logged)

    _run_all((1, _train_args(demo_cache, out, *common, "--resume", "latest"), tmp_path, {}))
    _finish(uninterrupted)
    full, resumed = _metrics(reference), _metrics(out)
    assert [m["step"] for m in resumed] == list(range(1, steps + 1))
    for a, b in zip(full, resumed):
        assert (a["loss"], a["lr"], a["grad_norm"]) == (b["loss"], b["lr"], b["grad_norm"]), (a, b)
    a, b = load_file(reference / "lora.safetensors"), load_file(out / "lora.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _launcher(tmp_path: Path, name: str, **env) -> subprocess.Popen:
    """The 2511 launcher on the tiny model; cache and run folders per ``name`` (shared by its machines)."""
    base = {"DATASET_JSON": str(tmp_path / "demo/dataset.json"), "VALIDATION_JSON": "", "STEPS": "6",
            "CACHE_DIR": str(tmp_path / f"cache-{name}"), "OUTPUT_DIR": str(tmp_path / f"run-{name}"),
            "RANK": "4", "PYTHON": sys.executable}
    return subprocess.Popen(["bash", str(ROOT / "Qwen-Image-Edit-2511.sh")], cwd=ROOT, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, **ENV, **base, **env})


def test_two_machines_on_loopback_run_both_phases_like_one_process(demo_dir, tmp_path):
    """NUM_MACHINES / MACHINE_RANK / MAIN_PROCESS_IP / MAIN_PROCESS_PORT: two launchers ("machines" on 127.0.0.1,
    one process each, sharing the cache and run folders as a network filesystem would) run phase 1 and phase 2
    together and give the LoRA of one process with doubled accumulation."""
    import shutil
    shutil.copytree(demo_dir, tmp_path / "demo")
    machines = {"NUM_MACHINES": "2", "NUM_PROCESSES": "2", "MAIN_PROCESS_IP": "127.0.0.1",
                "MAIN_PROCESS_PORT": str(_free_port()), "GRAD_ACCUM": "1"}
    procs = [_launcher(tmp_path, "two", MACHINE_RANK=str(rank), **machines) for rank in (0, 1)]
    procs.append(_launcher(tmp_path, "one", NUM_PROCESSES="1", GRAD_ACCUM="2"))
    try:
        outputs = [_finish(p) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    assert "phase 1: encoded" in outputs[0] and "phase 1: encoded" not in outputs[1]   # the main machine reports
    config = json.loads((tmp_path / "run-two/config.json").read_text())
    assert config["resolved"]["processes"] == 2
    _assert_same_cache(tmp_path / "cache-one", tmp_path / "cache-two")
    a, b = load_file(tmp_path / "run-one/lora.safetensors"), load_file(tmp_path / "run-two/lora.safetensors")
    assert a.keys() == b.keys() and any(a[k].abs().max() > 1e-4 for k in a if "lora_B" in k)
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-5)
