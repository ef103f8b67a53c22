"""Run folders that never mix or lose work (issue 12): reused folders, resume checks, locks, signals under DDP,
file modes, launcher values checked before phase 1, torn checkpoint files, unwritable folders."""

import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from conftest import ROOT, TINY_PIXELS
from edittuner.atomic import FolderLock, write_json
from edittuner.checkpoint import checkpoint_steps, write_checkpoint
from edittuner.cli import main
from edittuner.errors import EditTunerError
from edittuner.images import ResizeConfig
from edittuner.trainer import GracefulStop, TrainConfig, train


def _cfg(cache, out, **kw):
    """The issue's `T`: the tiny model, rank 4, accumulation 1, no previews."""
    base = dict(cache_dir=cache, output_dir=out, resize=ResizeConfig(max_pixels=TINY_PIXELS), rank=4,
                gradient_accumulation=1, validation_steps=0, eval_samples=1, report_to="none",
                gradient_checkpointing=False)
    return TrainConfig(**{**base, **kw})


def _steps(out):
    return sorted(int(p.name.split("-")[1]) for p in (out / "checkpoints").glob("step-*"))


def _cli(capsys, *args):
    code = main([str(a) for a in args])
    return code, capsys.readouterr().err


def test_fresh_run_into_a_used_folder_is_refused_and_overwrite_replaces_it(demo_cache, tmp_path):
    """The issue's reproduction: before the fix the second run kept only the old run's step-6."""
    out = tmp_path / "run"
    train(_cfg(demo_cache, out, max_steps=6, save_every=3), progress=False)
    with pytest.raises(EditTunerError, match="already holds a run .*--resume latest.*--overwrite"):
        train(_cfg(demo_cache, out, max_steps=4, save_every=2, keep_last=1, seed=7), progress=False)
    assert _steps(out) == [3, 6]                      # the refused run touched nothing
    (out / "wandb").mkdir()                           # may hold unsynced offline runs: --overwrite keeps it
    train(_cfg(demo_cache, out, max_steps=4, save_every=2, keep_last=1, seed=7, overwrite=True), progress=False)
    assert _steps(out) == [4]
    assert json.loads((out / "config.json").read_text())["seed"] == 7
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    assert (out / "wandb").is_dir()


def test_keep_last_prunes_only_the_runs_own_checkpoints(tmp_path):
    def files(run_id):
        return lambda tmp: write_json(tmp / "trainer_state.json", {"step": 0, "run_id": run_id})
    for step, run_id in ((10, "old"), (20, "old"), (1, "new"), (2, "new")):
        write_checkpoint(tmp_path, step, files(run_id), keep_last=1, run_id=run_id)
    assert checkpoint_steps(tmp_path) == [2, 20] and checkpoint_steps(tmp_path, "old") == [20]


def test_resume_honours_a_new_learning_rate_and_refuses_other_changes(demo_cache, tmp_path, capsys):
    out = tmp_path / "run"
    train(_cfg(demo_cache, out, max_steps=4, save_every=2, learning_rate=1e-3, warmup_steps=4), progress=False)
    with pytest.raises(EditTunerError) as err:
        train(_cfg(demo_cache, out, max_steps=6, resume="latest", rank=8, lora_targets=("to_q",), seed=3),
              progress=False)
    for listed in ("rank: checkpoint 4, this run 8", "lora_targets:", "seed: checkpoint 0, this run 3", "alpha:"):
        assert listed in str(err.value), str(err.value)
    with pytest.raises(EditTunerError, match="--max_steps 3: the checkpoint .* is already at step 4"):
        train(_cfg(demo_cache, out, max_steps=3, resume="latest"), progress=False)

    train(_cfg(demo_cache, out, max_steps=6, save_every=2, learning_rate=2e-4, warmup_steps=4, resume="latest"),
          progress=False)
    assert "learning_rate 0.001 -> 0.0002 from step 5" in capsys.readouterr().out
    lrs = [json.loads(line)["lr"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 2e-4, 2e-4])
    state = json.loads((out / "checkpoints/step-6/trainer_state.json").read_text())
    assert state["settings"]["learning_rate"] == 2e-4 and state["step"] == 6


def test_resume_at_the_final_step_writes_a_valid_summary(demo_cache, tmp_path):
    out = tmp_path / "run"
    first = train(_cfg(demo_cache, out, max_steps=2, save_every=2), progress=False)
    again = train(_cfg(demo_cache, out, max_steps=2, resume="latest"), progress=False)
    summary = json.loads((out / "summary.json").read_text())   # strict JSON: no NaN
    assert summary["steps"] == 2 and summary["loss"] == first["loss"] == again["loss"]
    json.loads((out / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"{c} in summary"))


def test_a_second_run_into_a_locked_folder_is_refused_naming_the_first(demo_cache, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    with FolderLock(out, "training run"):
        with pytest.raises(EditTunerError, match=f"another training run \\(pid {os.getpid()} on "):
            train(_cfg(demo_cache, out, max_steps=1), progress=False)
    train(_cfg(demo_cache, out, max_steps=1), progress=False)   # the lock went with its holder
    assert (out / "lora.safetensors").is_file()


def test_files_and_checkpoint_folders_follow_the_umask(demo_cache, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "run"
        train(_cfg(demo_cache, out, max_steps=1, save_every=1), progress=False)
    finally:
        os.umask(old)
    modes = {p.relative_to(out).as_posix(): stat.S_IMODE(p.stat().st_mode) for p in out.rglob("*")
             if p.name != ".edittuner.lock"}
    assert modes["checkpoints/step-1"] == 0o755 and modes["lora.safetensors"] == 0o644
    assert all(mode == (0o755 if (out / name).is_dir() else 0o644) for name, mode in modes.items()), modes


def test_torn_checkpoint_and_unwritable_output_get_one_message(demo_cache, tmp_path, capsys):
    out = tmp_path / "run"
    train(_cfg(demo_cache, out, max_steps=2, save_every=2), progress=False)
    torn = out / "checkpoints/step-2/optimizer.safetensors"
    torn.write_bytes(torn.read_bytes()[:100])
    common = ["--cache_dir", demo_cache, "--max_pixels", TINY_PIXELS, "--rank", 4, "--gradient_accumulation", 1,
              "--validation_steps", 0, "--report_to", "none", "--eval_samples", 0]
    code, err = _cli(capsys, "train", *common, "--output_dir", out, "--max_steps", 4, "--resume", "latest")
    assert code == 2 and "step-2: cannot read optimizer" in err and "earlier checkpoint" in err, err
    (tmp_path / "a_file").write_text("x")
    code, err = _cli(capsys, "train", *common, "--output_dir", tmp_path / "a_file/run", "--max_steps", 1)
    assert code == 2 and "--output_dir" in err and "is a file, not a folder" in err, err


@pytest.mark.parametrize("command", ["train", "sample"])
def test_seeds_beyond_32_bits_are_refused(demo_cache, tmp_path, capsys, command):
    with pytest.raises(SystemExit) as exit_:
        main([command, "--output_dir", str(tmp_path), "--seed", str(2**64)])
    assert exit_.value.code == 2 and "must be between 0 and 4294967295" in capsys.readouterr().err
    with pytest.raises(EditTunerError, match="--seed"):
        _cfg(demo_cache, tmp_path, seed=2**70)


def test_a_second_signal_stops_at_once():
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def _launch(tmp_path, **env):
    base = {"DATASET_JSON": str(tmp_path / "demo/dataset.json"), "CACHE_DIR": str(tmp_path / "cache"),
            "OUTPUT_DIR": str(tmp_path / "run"), "STEPS": "2", "SAVE_EVERY": "2", "VALIDATION_STEPS": "0",
            "NUM_PROCESSES": "1"}
    return subprocess.run(["bash", str(ROOT / "Qwen-Image-Edit-2511.sh"), "--eval_samples", "0"], capture_output=True,
                          text=True, cwd=ROOT, env={**os.environ, **base, **env}, timeout=600)


def test_launcher_checks_phase_2_before_phase_1_and_reruns_into_its_folder(demo_dir, trained_run, tmp_path):
    """A value only phase 2 refuses fails before phase 1 with phase 2's message and exit 2; so does a folder that
    holds another run, and OVERWRITE=on replaces that run, announced."""
    shutil.copytree(demo_dir, tmp_path / "demo")
    result = _launch(tmp_path, LR="1e-999")
    assert result.returncode == 2, result.stderr
    assert "error: LR=1e-999 (--learning_rate): --learning_rate 0.0: must be a positive number" in result.stderr
    assert "Traceback" not in result.stderr and "phase 1" not in result.stdout and not (tmp_path / "run").exists()

    shutil.copytree(trained_run[0], tmp_path / "run")
    again = _launch(tmp_path)
    assert again.returncode == 2 and "phase 1" not in again.stdout
    assert f"OUTPUT_DIR={tmp_path / 'run'} (--output_dir): --output_dir {tmp_path / 'run'} already holds a run" \
        in again.stderr, again.stderr
    assert not (tmp_path / "cache").exists()
    replaced = _launch(tmp_path, OVERWRITE="on", STEPS="3", SAVE_EVERY="3")
    assert replaced.returncode == 0 and "--overwrite: removing the earlier run" in replaced.stdout
    assert _steps(tmp_path / "run") == [3]


def test_a_failing_worker_exits_2_without_accelerates_traceback(tmp_path, capfd):
    from edittuner.launch import main as launch
    code = launch(["--config_file", str(ROOT / "accelerate_configs/single.yaml"), "--num_processes", "1", "-m",
                   "edittuner", "train", "--cache_dir", str(tmp_path / "none"), "--output_dir", str(tmp_path / "run")])
    err = capfd.readouterr().err
    assert code == 2 and "Traceback" not in err and "no manifest.json" in err, err


def _workers(launcher_pid: int) -> dict[int, int]:
    """RANK -> pid of the worker processes under a launcher."""
    import psutil
    found = {}
    for child in psutil.Process(launcher_pid).children(recursive=True):
        try:
            env = child.environ()
        except psutil.Error:
            continue
        if "RANK" in env and "edittuner" in " ".join(child.cmdline()):
            found[int(env["RANK"])] = child.pid
    return found


@pytest.mark.xdist_group("distributed")
def test_sigint_to_one_ddp_worker_stops_every_rank_at_the_same_step(demo_cache, tmp_path):
    out = tmp_path / "run"
    port = str(29500 + os.getpid() % 1000)
    cmd = [sys.executable, "-m", "edittuner.launch", "--config_file", str(ROOT / "accelerate_configs/ddp.yaml"),
           "--num_processes", "2", "--main_process_port", port, "-m", "edittuner", "train",
           "--cache_dir", str(demo_cache), "--output_dir", str(out), "--max_pixels", str(TINY_PIXELS), "--rank", "4",
           "--gradient_accumulation", "1", "--validation_steps", "0", "--report_to", "none", "--eval_samples", "0",
           "--gradient_checkpointing", "off", "--max_steps", "100000", "--save_every", "100000"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            metrics = out / "metrics.jsonl"
            if metrics.exists() and len(metrics.read_text().splitlines()) >= 3:
                break
            time.sleep(0.2)
        workers = _workers(proc.pid)
        assert proc.poll() is None and set(workers) == {0, 1}, (workers, proc.poll())
        os.kill(workers[1], signal.SIGINT)   # only rank 1 hears it
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, stderr[-3000:]
    steps = _steps(out)
    assert len(steps) == 1 and f"stopped at step {steps[0]}" in stdout, (steps, stdout[-1000:])
    logged = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps[0] + 1))
    assert load_file(out / f"checkpoints/step-{steps[0]}/lora.safetensors")


def test_a_second_phase_1_into_a_locked_cache_is_refused(demo_dir, tmp_path, resize):
    from edittuner.cache import PrecomputeConfig, precompute_cache
    from edittuner.models import ModelSource
    cache = tmp_path / "cache"
    cache.mkdir()
    cfg = PrecomputeConfig(dataset_json=demo_dir / "dataset.json", cache_dir=cache, model=ModelSource(), resize=resize)
    with FolderLock(cache, "phase 1 (precompute)"):
        with pytest.raises(EditTunerError, match=r"being written by another phase 1 \(precompute\) \(pid"):
            precompute_cache(cfg, progress=False)
    assert not (cache / "manifest.json").exists()
