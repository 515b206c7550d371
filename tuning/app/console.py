"""A quiet console: only our own lines (the data summary, the progress, the final summary).

What Ray and Optuna say on their own (Ray's token-authentication notice, Optuna's "A new study
created in memory", Ray Tune's "Configuration for experiment" box and its TensorBoard hint, which
names a path that is not the run dir, warnings) goes to `<run dir>/search.log` instead, where it
is kept. `--verbose` leaves every stream as it is."""
from __future__ import annotations

import contextlib
import logging
import os
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterator, TextIO

from tuning.lib.errors import warnings_to
from tuning.lib.files import cache_root

LOG_FILE = "search.log"
# the libraries whose log records belong in the log file, not on the console
LOGGERS = ("ray", "optuna", "py.warnings", "filelock", "urllib3", "huggingface_hub")

@contextlib.contextmanager
def quiet(log_file: Path, verbose: bool = False) -> Iterator[TextIO]:
    """Within: other tools' prints and log records go to `log_file`. Yields the stream for our
    own lines (the console as it was on entry).

    The run dir may not exist yet (a new search creates it only once its checks passed, so that a
    refused search leaves nothing that blocks the next): the log is written beside it in the cache
    first and appended to `log_file` at the end if the run dir exists by then; otherwise it stays
    there (`<cache>/logs/`)."""
    ours = sys.stdout
    if verbose:
        yield ours
        return
    import optuna

    optuna.logging.get_verbosity()  # Optuna adds its stderr handler on first use: before we swap handlers
    staging = cache_root() / "logs"
    staging.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="search-", suffix=".log", dir=staging)
    try:
        with os.fdopen(fd, "a", buffering=1) as log, _redirected(log):
            yield ours
    finally:
        _keep(Path(name), log_file)


def _keep(staged: Path, log_file: Path) -> None:
    if not log_file.parent.is_dir():
        return  # a refused search: its one-line error says what matters; the log stays in the cache
    with open(log_file, "a") as out:
        out.write(staged.read_text(errors="replace"))
    staged.unlink()


@contextlib.contextmanager
def _redirected(log: TextIO) -> Iterator[None]:
    handler = logging.StreamHandler(log)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    saved = []
    for name in LOGGERS:
        logger = logging.getLogger(name)
        saved.append((logger, logger.handlers[:], logger.propagate, logger.level))
        logger.handlers, logger.propagate = [handler], False
        if logger.level == logging.NOTSET or logger.level > logging.INFO:
            logger.setLevel(logging.INFO)
    logging.captureWarnings(True)
    try:
        with warnings_to(sys.stderr), contextlib.redirect_stdout(log), contextlib.redirect_stderr(log), \
                warnings.catch_warnings():
            warnings.simplefilter("default")
            yield
    finally:
        logging.captureWarnings(False)
        for logger, handlers, propagate, level in saved:
            logger.handlers, logger.propagate, logger.level = handlers, propagate, level

