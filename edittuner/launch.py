"""`python -m edittuner.launch <accelerate launch args>`: accelerate's launcher, with the workers' exit status.

accelerate turns a worker that exits 2 (a clear `edittuner` error, already printed) into a CalledProcessError
traceback and exit 1; the launchers go through here so the user sees the message alone and the status stays 2.
"""

from __future__ import annotations

import signal
import subprocess
import sys


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
