"""User-facing errors: one line, exit status 2, nothing half-written."""


class UserError(Exception):
    """Bad input from the user (config, paths, prompts). The CLI prints it as one line and exits 2."""

    exit_code = 2


class TrainingStopped(Exception):
    """Training stopped itself for a reason the user must see (e.g. a non-finite loss). Exit 1."""

    exit_code = 1


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


ECHO_CHARS = 200  # the most of an echoed value or message a one-line error repeats (as rayjobs/config/load.py)


def capped(text: str, limit: int = ECHO_CHARS) -> str:
    """``text`` as one line of at most ``limit`` characters (then '…'): a huge message stays one short line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "…"

