"""User-facing errors: one clear message that names the culprit and the fix, never a traceback."""

from contextlib import contextmanager

# Seeds go through torch.manual_seed after arithmetic with positions and epochs: 32 bits leave room for that.
MAX_SEED = 2**32 - 1


class EditTunerError(Exception):
    """A problem with the user's input (file, row, flag, cache, model directory).

    The CLI prints ``str(error)`` and exits with status 2; anything else is a bug and keeps its traceback.
    ``flag``: the option the problem is about when the message does not start with it (``about``); the CLI
    names the launcher variable behind that option.
    """

    flag: str | None = None


@contextmanager
def about(flag: str):
    """Errors raised inside are about the option ``flag`` (an error that names its own flag keeps it)."""
    try:
        yield
    except EditTunerError as exc:
        if exc.flag is None and not str(exc).startswith("--"):
            exc.flag = flag
        raise


def check_seed(seed: int, flag: str = "--seed") -> int:
    if not 0 <= seed <= MAX_SEED:
        raise EditTunerError(f"{flag} {seed}: must be between 0 and {MAX_SEED}")
    return seed
