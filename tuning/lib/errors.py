"""Errors that are the user's to fix. The CLIs turn them into one line on stderr and exit code 2;
anything else is a bug and keeps its traceback."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator, TextIO


_WARNINGS_TO: list[TextIO] = []  # where `warn` writes while other tools' output goes to a log


def warn(message: str) -> None:
    """One line for the user on the console, even while Ray's and Optuna's output is redirected to
    the run's log (tuning.app.console)."""
    print(f"warning: {message}", file=_WARNINGS_TO[-1] if _WARNINGS_TO else sys.stderr, flush=True)


@contextmanager
def warnings_to(stream: TextIO) -> Iterator[None]:
    _WARNINGS_TO.append(stream)
    try:
        yield
    finally:
        _WARNINGS_TO.pop()


class UsageError(Exception):
    """Bad input: an unknown name, missing data, an impossible resource request."""


@contextmanager
def exit_on_usage_error(prog: str) -> Iterator[None]:
    try:
        yield
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
