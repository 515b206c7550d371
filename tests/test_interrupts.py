"""Ctrl-C and SIGTERM stop a search gracefully once, at once the second time (tuning.app.interrupts).
Real signals sent to this process; the whole search's answer to them: tests/test_board_kept.py."""
from __future__ import annotations

import os
import signal
import time

import pytest

from tuning.app.interrupts import RAY_SIGINT_ENV, stop_signals


def send(sig: signal.Signals) -> None:
    os.kill(os.getpid(), sig)
    time.sleep(0.05)  # Python runs the handler at the next bytecode boundary


@pytest.mark.parametrize("sig, said", [(signal.SIGTERM, "SIGTERM"), (signal.SIGINT, "Ctrl-C")])
def test_the_first_signal_in_the_trials_asks_ray_tune_to_stop_the_second_interrupts(sig, said):
    ray_stops = []
    before = signal.getsignal(signal.SIGUSR1), signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    try:
        with stop_signals() as signals:
            assert os.environ[RAY_SIGINT_ENV] == "1"  # Ray Tune leaves SIGINT to us during fit
            with signals.fit():
                signal.signal(signal.SIGUSR1, lambda s, f: ray_stops.append(s))  # as Tuner.fit installs its stop
                send(sig)
                assert ray_stops == [signal.SIGUSR1]
                with pytest.raises(KeyboardInterrupt):
                    send(sig)
            assert signals.stopped_by(3, 20) == f"{said}: 3 of 20 trials started; --resume continues the search"
        assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before[1:]
        assert RAY_SIGINT_ENV not in os.environ
    finally:
        signal.signal(signal.SIGUSR1, before[0])


def test_a_signal_outside_the_trials_interrupts_at_once_and_none_says_nothing():
    with stop_signals() as signals:
        assert signals.stopped_by(20, 20) is None
        with pytest.raises(KeyboardInterrupt):
            send(signal.SIGTERM)
