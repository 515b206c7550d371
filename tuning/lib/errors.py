"""Errors that are the user's to fix. The CLIs turn them into one line on stderr and exit code 2;
anything else is a bug and keeps its traceback."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Iterator


class UsageError(Exception):
    """Bad input: an unknown name, missing data, an impossible resource request."""


@contextmanager
def exit_on_usage_error(prog: str) -> Iterator[None]:
    try:
        yield
    except UsageError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        raise SystemExit(2) from None
