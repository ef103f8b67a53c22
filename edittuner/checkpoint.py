"""Checkpoints as safetensors + JSON (no pickle): LoRA, optimizer state, LR schedule and loop position.

checkpoints/step-N/ is written to a temporary directory and renamed into place, so a crash during a save
leaves the previous checkpoints intact.
"""

from __future__ import annotations

import errno
import json
import re
import shutil
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .atomic import atomic_dir, atomic_path
from .errors import EditTunerError


def _split_state(state, prefix: str, tensors: dict) -> object:
    """Move every tensor of a nested state into ``tensors`` and leave a JSON-able skeleton behind."""
    if isinstance(state, torch.Tensor):
        key = prefix.rstrip(".")
        tensors[key] = state.detach().cpu().contiguous()
        return {"__tensor__": key}
    if isinstance(state, dict):
        return {"__dict__": [[_split_state(k, f"{prefix}k{i}.", tensors), _split_state(v, f"{prefix}{i}.", tensors)]
                             for i, (k, v) in enumerate(state.items())]}
    if isinstance(state, (list, tuple)):
        return {"__list__": [_split_state(v, f"{prefix}{i}.", tensors) for i, v in enumerate(state)]}
    if isinstance(state, float) and state != state:
        return {"__float__": "nan"}
    if state is None or isinstance(state, (bool, int, float, str)):
        return state
    raise TypeError(f"cannot store {type(state).__name__} in a checkpoint")


def _join_state(skeleton, tensors: dict):
    if isinstance(skeleton, dict):
        if "__tensor__" in skeleton:
            return tensors[skeleton["__tensor__"]]
        if "__dict__" in skeleton:
            return {_join_state(k, tensors): _join_state(v, tensors) for k, v in skeleton["__dict__"]}
        if "__list__" in skeleton:
            return [_join_state(v, tensors) for v in skeleton["__list__"]]
        if "__float__" in skeleton:
            return float(skeleton["__float__"])
    return skeleton


def save_state(directory: Path, name: str, state) -> None:
    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split_state(state, "", tensors)
    with atomic_path(directory / f"{name}.safetensors") as tmp:
        save_file(tensors, str(tmp))
    with atomic_path(directory / f"{name}.json") as tmp:
        tmp.write_text(json.dumps(skeleton))


def load_state(directory: Path, name: str):
    try:
        tensors = load_file(str(directory / f"{name}.safetensors"))
        skeleton = json.loads((directory / f"{name}.json").read_text())
    except (OSError, ValueError, RuntimeError, SafetensorError) as exc:
        raise EditTunerError(f"checkpoint {directory}: cannot read {name} ({exc}); the file is damaged or "
                             "incomplete: resume from an earlier checkpoint with --resume <run>/checkpoints/step-N"
                             ) from None
    return _join_state(skeleton, tensors)


def _run_id_of(checkpoint: Path) -> str | None:
    try:
        return json.loads((checkpoint / "trainer_state.json").read_text()).get("run_id")
    except (OSError, ValueError, AttributeError):
        return None


def checkpoint_steps(checkpoints_dir: Path, run_id: str | None = None) -> list[int]:
    """Steps of the complete checkpoints in ``checkpoints_dir`` (only run ``run_id``'s when given)."""
    if not checkpoints_dir.is_dir():
        return []
    return sorted(int(m.group(1)) for p in checkpoints_dir.iterdir()
                  if (m := re.fullmatch(r"step-(\d+)", p.name)) and (p / "trainer_state.json").is_file()
                  and (run_id is None or _run_id_of(p) == run_id))


def write_checkpoint(checkpoints_dir: Path, step: int, write_files, keep_last: int | None = None,
                     run_id: str | None = None) -> Path:
    """``write_files(tmp_dir)`` fills a temporary directory that then becomes checkpoints/step-N.

    If writing fails (a full disk, say), the temporary directory is removed, no step-N appears, the earlier
    checkpoints are left as they were (``keep_last`` prunes only after a successful save), and the error says
    which checkpoint is the last good one. ``keep_last`` prunes run ``run_id``'s checkpoints only.
    """
    checkpoints_dir = Path(checkpoints_dir)
    final = checkpoints_dir / f"step-{step}"
    try:
        with atomic_dir(final) as tmp:
            write_files(tmp)
    except OSError as exc:
        steps = checkpoint_steps(checkpoints_dir)   # a failed save never touches an existing step-N
        last = (f"the last good checkpoint is {checkpoints_dir / f'step-{steps[-1]}'} (resume from it with "
                "--resume latest)") if steps else "there is no earlier checkpoint"
        if exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC)):
            cause = f"the disk is full ({exc.strerror or exc}); free some disk space"
        else:
            cause = f"{exc.strerror or exc}; fix the problem"
        raise EditTunerError(f"could not save checkpoint {final}: {cause}. Nothing was left half-written and {last}"
                             ) from None
    if keep_last:
        for old in checkpoint_steps(checkpoints_dir, run_id)[:-keep_last]:
            shutil.rmtree(checkpoints_dir / f"step-{old}", ignore_errors=True)
    return final


def read_trainer_state(checkpoint: Path) -> dict:
    try:
        state = json.loads((checkpoint / "trainer_state.json").read_text())
        int(state["step"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EditTunerError(f"checkpoint {checkpoint}: trainer_state.json is damaged ({exc}); resume from an earlier "
                             "checkpoint with --resume <run>/checkpoints/step-N") from None
    return state


def resolve_resume(spec: str, output_dir: Path) -> Path:
    if spec == "latest":
        steps = checkpoint_steps(output_dir / "checkpoints")
        if not steps:
            raise EditTunerError(f"--resume latest: no checkpoint under {output_dir / 'checkpoints'}")
        return output_dir / "checkpoints" / f"step-{steps[-1]}"
    path = Path(spec)
    if not (path / "trainer_state.json").is_file():
        raise EditTunerError(f"--resume {spec}: not a checkpoint directory (no trainer_state.json)")
    return path


# What a run writes into its folder; a fresh run into a folder holding any of these is refused (or, with
# --overwrite, removes exactly these). wandb/ stays: it may hold offline runs not yet synced.
RUN_OUTPUTS = ("checkpoints", "lora.safetensors", "metrics.jsonl", "summary.json", "config.json", "validation",
               "wandb_run_id.txt")


def describe_run(output_dir: Path) -> str | None:
    """What an earlier run left in ``output_dir`` (None when it holds no run)."""
    found = [name for name in RUN_OUTPUTS[1:5] if (output_dir / name).exists()]
    steps = checkpoint_steps(output_dir / "checkpoints")
    if steps:
        found.insert(0, f"checkpoints up to step-{steps[-1]}")
    return ", ".join(found) or None


def claim_run_dir(output_dir: Path, overwrite: bool, dry_run: bool = False) -> None:
    """A fresh run owns its folder: refuse one that holds another run, unless --overwrite asks to replace it."""
    found = describe_run(output_dir)
    if found is None:
        return
    if not overwrite:
        raise EditTunerError(f"--output_dir {output_dir} already holds a run ({found}); continue it with "
                             "--resume latest, choose a new --output_dir, or pass --overwrite to replace it")
    print(f"--overwrite: {'would remove' if dry_run else 'removing'} the earlier run in {output_dir} ({found})")
    if dry_run:
        return
    for name in RUN_OUTPUTS:
        path = output_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()
