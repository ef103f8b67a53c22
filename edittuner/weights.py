"""Reading model weights for every family: safetensors files (sharded or not) with one clear message per bad
file (truncated download, not safetensors, missing shard), strict key matching, and folder identities."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .errors import EditTunerError


def missing_files(required: list, folder: Path) -> list[str]:
    """Files of a component absent from ``folder``, shards named in an index included. ``required``: file names,
    a tuple where any one of several will do."""
    missing = []
    for entry in required:
        options = entry if isinstance(entry, tuple) else (entry,)
        present = [name for name in options if (folder / name).is_file()]
        if not present:
            missing.append(str(folder / options[0]))
            continue
        if present[0].endswith(".index.json"):
            for shard in sorted(set(_read_index(folder / present[0]).values())):
                if not (folder / shard).is_file():
                    missing.append(str(folder / shard))
    return missing


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise EditTunerError(f"{path}: not a valid safetensors index ({type(exc).__name__}: {exc}); re-download "
                             "that file") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise EditTunerError(f"{path}: not a valid safetensors index (\"weight_map\" must map tensor names to "
                             "file names); re-download that file")
    return weight_map


def weight_files(folder: Path, stem: str) -> list[Path]:
    index = folder / f"{stem}.safetensors.index.json"
    if index.is_file():
        return [folder / name for name in sorted(set(_read_index(index).values()))]
    return [folder / f"{stem}.safetensors"]


# What a weight file that is truncated (an interrupted download), empty or not safetensors at all raises.
# SafetensorError subclasses neither OSError nor ValueError.
_WEIGHT_FILE_ERRORS = (OSError, ValueError, RuntimeError, SafetensorError)


def _bad_weight_file(path: Path, exc: BaseException) -> EditTunerError:
    return EditTunerError(f"{path}: not a complete safetensors file ({exc}); an interrupted download leaves a "
                          "truncated file: re-download that file")


def check_weight_files(files: list[Path]) -> None:
    """Open each file's header (cheap: no tensor is read), which is enough to catch a truncated download."""
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu"):
                pass
        except _WEIGHT_FILE_ERRORS as exc:
            raise _bad_weight_file(path, exc) from None


def read_safetensors(files: list[Path], dtype: torch.dtype | None = None) -> dict[str, torch.Tensor]:
    state = {}
    for path in files:
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    state[key] = tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor
        except _WEIGHT_FILE_ERRORS as exc:
            raise _bad_weight_file(path, exc) from None
    return state


def load_strict(model: torch.nn.Module, state: dict[str, torch.Tensor], where: str, assign: bool = False) -> None:
    """load_state_dict that turns key mismatches into one readable error."""
    expected = set(model.state_dict().keys())
    missing = sorted(expected - set(state))
    unexpected = sorted(set(state) - expected)
    if missing or unexpected:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected (e.g. {unexpected[:3]})")
        raise EditTunerError(f"{where}: weights do not match the model: {'; '.join(parts)}. "
                             "Check that the folder holds a component of the right kind for this model.")
    model.load_state_dict(state, strict=True, assign=assign)


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise EditTunerError(f"{path}: unreadable JSON ({exc}); re-download that file") from None


def hash_folder(folder: Path) -> str:
    """Identity of a component folder: small files by content, weight files by name and size."""
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        if path.suffix in (".safetensors", ".bin", ".pt"):
            digest.update(str(path.stat().st_size).encode())
        else:
            digest.update(path.read_bytes())
    return digest.hexdigest()[:16]
