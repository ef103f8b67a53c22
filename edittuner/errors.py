"""User-facing errors: one clear message that names the culprit and the fix, never a traceback."""


class EditTunerError(Exception):
    """A problem with the user's input (file, row, flag, cache, model directory).

    The CLI prints ``str(error)`` and exits with status 2; anything else is a bug and keeps its traceback.
    """


def require(condition: bool, message: str) -> None:
    if not condition:
        raise EditTunerError(message)
