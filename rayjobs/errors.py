"""User-facing errors: one line, exit status 2, nothing half-written."""

import signal


class UserError(Exception):
    """Bad input from the user (config, paths, prompts). The CLI prints it as one line and exits 2."""

    exit_code = 2


class TrainingStopped(Exception):
    """Training stopped itself for a reason the user must see (e.g. a non-finite loss). Exit 1."""

    exit_code = 1


class Interrupted(Exception):
    """A signal (Ctrl-C, SIGTERM) ended the work early, in a state that can be continued; the message is one
    line that says how. Exit 128 + the signal's number (130 for SIGINT, 143 for SIGTERM), the status a shell
    shows for a process the signal ended, and what the CLI already returns for a KeyboardInterrupt."""

    def __init__(self, message: str, signum: int = signal.SIGINT):
        super().__init__(message)
        self.signum = int(signum)
        self.exit_code = 128 + self.signum


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none), for one-line errors."""
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


ECHO_CHARS = 200  # the most of an echoed value or message a one-line error repeats (as rayjobs/config/load.py)


def capped(text: str, limit: int = ECHO_CHARS) -> str:
    """``text`` as one line of at most ``limit`` characters (then '…'): a huge message stays one short line."""
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[:limit] + "…"

