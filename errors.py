"""The one-line errors of every moekd command: the exceptions that end a run or a command, and run_cli, which
turns them into one line on stderr and an exit code. A leaf module: it imports nothing of this project, so
every other module can import it.
"""
from __future__ import annotations

import sys


class MoekdError(ValueError):
    """Bad input from the user: printed as one line, exit code 2."""


class RunStopped(MoekdError):
    """Training cannot go on (non-finite numbers, full disk); main() names the last good checkpoint."""


class RunInterrupted(BaseException):
    """SIGINT/SIGTERM stopped a run: printed as one line, exit code 128 + the signal's number.
    A BaseException, as KeyboardInterrupt, so no `except Exception` on the way swallows it."""

    def __init__(self, message: str, signum: int, *, quiet: bool = False):
        super().__init__(message)
        self.code, self.quiet = 128 + signum, quiet


def run_cli(entry) -> int:
    """Run a main(); bad input (MoekdError) becomes one line on stderr and exit code 2."""
    try:
        entry()
    except MoekdError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RunInterrupted as e:
        if not e.quiet:
            print(e, file=sys.stderr)
        return e.code
    return 0
