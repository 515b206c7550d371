"""A search stopped by a person: Ctrl-C, or SIGTERM (docker stop, Kubernetes, Slurm's scancel).

Either one, while the trials run, asks Ray Tune to stop as its own Ctrl-C handling does (through
the SIGUSR1 handler `Tuner.fit` installs): the running trials stop, its state is saved, the best
epoch found so far is exported, the summary says the search was cut short, and `--resume`
continues it. A second signal, or one outside the trials, raises KeyboardInterrupt at once.
Without this, SIGTERM met Ray's handler in the driver: a stack dump and exit 134."""
from __future__ import annotations

import os
import signal
import threading
from contextlib import contextmanager
from types import FrameType
from typing import Iterator

NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}
RAY_SIGINT_ENV = "TUNE_DISABLE_SIGINT_HANDLER"  # Ray Tune leaves SIGINT to us; it still listens on SIGUSR1


class StopSignals:
    def __init__(self) -> None:
        self.received: list[str] = []
        self.fitting = False  # inside Tuner.fit: Ray Tune's SIGUSR1 handler is the live one

    def handle(self, signum: int, frame: FrameType | None) -> None:
        self.received.append(NAMES[signal.Signals(signum)])
        ray_stop = signal.getsignal(signal.SIGUSR1)
        if self.fitting and len(self.received) == 1 and callable(ray_stop):
            ray_stop(signal.SIGUSR1, frame)
        else:
            raise KeyboardInterrupt

    @contextmanager
    def fit(self) -> Iterator[None]:
        self.fitting = True
        try:
            yield
        finally:
            self.fitting = False

    def stopped_by(self, started: int, samples: int) -> str | None:
        """What the summary says of a search a person stopped, else None."""
        if not self.received:
            return None
        return f"{self.received[0]}: {started} of {samples} trials started; --resume continues the search"


@contextmanager
def stop_signals() -> Iterator[StopSignals]:
    """Within: Ctrl-C and SIGTERM are handled as the module says (main thread only: elsewhere
    Python allows no handler, and Ray Tune's own stays)."""
    signals = StopSignals()
    if threading.current_thread() is not threading.main_thread():
        yield signals
        return
    was_env = os.environ.get(RAY_SIGINT_ENV)
    os.environ[RAY_SIGINT_ENV] = "1"
    previous = {s: signal.signal(s, signals.handle) for s in NAMES}
    try:
        yield signals
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler if handler is not None else signal.SIG_DFL)
        if was_env is None:
            os.environ.pop(RAY_SIGINT_ENV, None)
        else:
            os.environ[RAY_SIGINT_ENV] = was_env
