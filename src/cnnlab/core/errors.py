"""The one kind of error a user can fix, and how commands show it: one line, no traceback."""

from __future__ import annotations

import functools
import logging
import sys
from typing import NoReturn


class CnnlabError(Exception):
    """A problem the user can fix (bad config, missing data, unknown run); shown as one line."""


class RunFailed(CnnlabError):
    """A training that failed with its MLflow run open (marked FAILED, its error tagged on it), or that
    finished without what its command needs: the failure, with the run's id, so that nothing records
    the job a second time. Raised `from` the error itself when there is one (its `__cause__`), whose
    words it keeps."""

    def __init__(self, message: str, run_id: str | None):
        super().__init__(message)
        self.run_id = run_id


def one_line(exc: BaseException) -> str:
    """`Type: first line of the message`, for an error that is not a CnnlabError."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__


def show(line: str) -> None:
    """A problem as cnnlab shows one: `error: <line>` on stderr."""
    print(f"error: {line}", file=sys.stderr)


def exit_with(line: str, status: int = 1) -> NoReturn:
    """End the process with one `error:` line and `status`. For the places where raising would not
    reach the user as one line: Hydra prints an exception from a task, a sweeper or a callback
    with its traceback (or swallows it), so those end the process themselves."""
    show(line)
    sys.exit(status)


def command(main):
    """Wrap a command's main(argv) -> int: INFO logging, and a CnnlabError becomes one
    `error: ...` line on stderr with exit status 1 instead of a traceback."""

    @functools.wraps(main)
    def wrapper(argv: list[str] | None = None) -> int:
        logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
        try:
            return main(argv)
        except CnnlabError as exc:
            show(str(exc))
            return 1

    return wrapper
