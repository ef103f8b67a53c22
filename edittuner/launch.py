"""`python -m edittuner.launch <accelerate launch args>`: accelerate's launcher, with the workers' exit status.

accelerate turns a worker that exits 2 (a clear `edittuner` error, already printed) into a CalledProcessError
traceback and exit 1; the launchers go through here so the user sees the message alone and the status stays 2.
``deepspeed_config_file`` reads an accelerate config the way the workers will see it (`edittuner check` uses it).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from .errors import EditTunerError


def deepspeed_config_file(config_file: str | os.PathLike) -> Path | None:
    """The DeepSpeed JSON an accelerate config file names (accelerate exports it to the workers, and phase 2 then
    trains under ZeRO), or None for a config without DeepSpeed."""
    import yaml
    path = Path(config_file)
    if not path.is_file():
        raise EditTunerError(f"accelerate config {path}: no such file (see accelerate_configs/: single.yaml, "
                             "ddp.yaml, zero3.yaml, zero3_offload.yaml)")
    try:
        config = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        raise EditTunerError(f"accelerate config {path}: cannot read it as YAML ({exc})") from None
    if not isinstance(config, dict):
        raise EditTunerError(f"accelerate config {path}: expected a mapping of settings (see accelerate_configs/)")
    if config.get("distributed_type") != "DEEPSPEED":
        return None
    deepspeed = config.get("deepspeed_config")
    file = deepspeed.get("deepspeed_config_file") if isinstance(deepspeed, dict) else None
    if not file:
        raise EditTunerError(f"accelerate config {path}: DeepSpeed without deepspeed_config.deepspeed_config_file; "
                             "edittuner drives ZeRO-3 from a DeepSpeed JSON (see accelerate_configs/zero3.yaml)")
    return Path(file)


def _status(code: int) -> int:
    return 128 - code if code < 0 else code   # killed by signal N: the shell's 128 + N


def main(argv: list[str] | None = None) -> int:
    from accelerate.commands.launch import launch_command, launch_command_parser
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError

    args = launch_command_parser().parse_args(argv)
    try:
        launch_command(args)
    except subprocess.CalledProcessError as exc:
        return _status(exc.returncode)
    except ChildFailedError as exc:
        codes = [failure.exitcode for _, failure in sorted(exc.failures.items())]
        print(f"edittuner: a worker process failed (exit status {codes}); its message is above", file=sys.stderr)
        return _status(codes[0]) if codes else 1
    except KeyboardInterrupt:
        return 128 + signal.SIGINT
    return 0


if __name__ == "__main__":
    sys.exit(main())
