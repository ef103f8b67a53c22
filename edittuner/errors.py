"""User-facing errors: one clear message that names the culprit and the fix, never a traceback."""

# Seeds go through torch.manual_seed after arithmetic with positions and epochs: 32 bits leave room for that.
MAX_SEED = 2**32 - 1


class EditTunerError(Exception):
    """A problem with the user's input (file, row, flag, cache, model directory).

    The CLI prints ``str(error)`` and exits with status 2; anything else is a bug and keeps its traceback.
    """


def check_seed(seed: int, flag: str = "--seed") -> int:
    if not 0 <= seed <= MAX_SEED:
        raise EditTunerError(f"{flag} {seed}: must be between 0 and {MAX_SEED}")
    return seed
