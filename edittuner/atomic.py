"""Write-then-rename helpers, so a failed run never leaves a half-written file where a good one was."""

from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import math
import os
import shutil
import socket
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import EditTunerError


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def plain_mode(path: Path, directory: bool = False) -> None:
    """Give a temp file (0600) or temp folder (0700) the mode a plain open()/mkdir would, so another account (a
    ComfyUI service user) can read what we write when the umask lets it."""
    os.chmod(path, (0o777 if directory else 0o666) & ~_umask())


@contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it over ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        plain_mode(tmp)   # after the block: some writers (safetensors) make the file anew
        os.replace(tmp, final)
    finally:
        if tmp.exists():
            tmp.unlink()


@contextmanager
def atomic_dir(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary directory beside ``final``; it replaces ``final`` only if the block succeeds."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    plain_mode(tmp, directory=True)
    try:
        yield tmp
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            try:
                os.replace(tmp, final)
            except BaseException:
                os.replace(old, final)   # put the previous version back under its name
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def json_safe(data):
    """``data`` with every NaN or infinity as None, so what we write is valid JSON for any reader."""
    if isinstance(data, float):
        return data if math.isfinite(data) else None
    if isinstance(data, dict):
        return {k: json_safe(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return [json_safe(v) for v in data]
    return data


def write_json(path: str | os.PathLike, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(json_safe(data), indent=2, ensure_ascii=False, allow_nan=False) + "\n",
                       encoding="utf-8")


def safe_filename(text: str, suffix: str = "", max_chars: int = 80) -> str:
    """A file name made from user text (a sample id) that cannot leave its folder: only letters, digits and
    ``-_.`` survive, no leading dot, at most ``max_chars``; an id that needed changing gets a hash of the original
    so that two ids never share a file."""
    safe = "".join(c if c.isascii() and (c.isalnum() or c in "-_.") else "_" for c in text)[:max_chars].lstrip(".")
    if safe and safe == text:
        return safe + suffix
    return f"{safe or 'id'}-{hashlib.sha1(text.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}{suffix}"


def check_output_dir(folder: str | os.PathLike, flag: str, output: str | os.PathLike | None = None) -> Path:
    """Refuse, before any work is done, a folder that cannot hold our output: make it (with its parents) and write
    and remove a probe file there, so a read-only disk or a path through a regular file is found now, not after
    the work. ``output`` is the file the flag named (for the message), when it is not the folder itself."""
    folder = Path(folder)
    where = f"{flag} {output if output is not None else folder}"
    blocking = next((p for p in (folder, *folder.parents) if p.exists() and not p.is_dir()), None)
    if blocking is not None:
        raise EditTunerError(f"{where}: {blocking} is a file, not a folder; choose another path")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".edittuner-probe-", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise EditTunerError(f"{where}: cannot write in {folder} ({exc.strerror or exc}); choose a folder you can "
                             "write to") from None
    return folder


def check_output_file(path: str | os.PathLike, flag: str) -> None:
    """Refuse, before any work is done, an output file that is an existing folder or cannot be written."""
    path = Path(path)
    if path.is_dir():
        raise EditTunerError(f"{flag} {path}: is a folder; name a file to write, e.g. {path / 'out'}{path.suffix}")
    check_output_dir(path.parent, flag, output=path)


class FolderLock:
    """An exclusive lock on a folder being written (``.edittuner.lock``, flock: the OS drops it when the process
    dies, so a crashed run never leaves a stale lock). A second writer is refused, naming the first."""

    NAME = ".edittuner.lock"

    def __init__(self, folder: str | os.PathLike, what: str):
        self.path, self.what, self._fd = Path(folder) / self.NAME, what, None

    def __enter__(self) -> "FolderLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            os.close(fd)
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            holder = self.path.read_text(errors="replace").strip() or "another process"
            raise EditTunerError(f"{self.path.parent} is being written by another {self.what} ({holder}); wait for "
                                 "it to finish or stop it, or choose another folder") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')}"
                 .encode())
        self._fd = fd
        return self

    @classmethod
    def remove_empty(cls, folder: Path) -> None:
        """Remove ``folder`` if it holds nothing but a released lock file (a run that wrote nothing)."""
        try:
            if {p.name for p in folder.iterdir()} <= {cls.NAME}:
                (folder / cls.NAME).unlink(missing_ok=True)
                folder.rmdir()
        except OSError:
            pass

    def __exit__(self, *exc) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing drops the flock; the file stays (removing it would race a new locker)
            self._fd = None
