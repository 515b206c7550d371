"""Progress while a search runs, instead of Ray's wall of tables (--verbose): a live bar on a
terminal (trials done of total, best so far, time left under a budget), one plain line every
15 s and at each trial's end elsewhere (CI, a log file)."""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

from ray.tune import Callback
from ray.tune.experiment import Trial

from tuning.lib import metrics as M


class StatusLine(Callback):
    def __init__(self, samples: int, max_epochs: int, every_s: float = 15.0, out: TextIO | None = None,
                 time_left: Callable[[], float] | None = None) -> None:
        self.samples, self.max_epochs, self.every_s = samples, max_epochs, every_s
        self.out = out or sys.stdout
        self.time_left = time_left  # seconds the budget leaves, when there is one
        self.started = time.time()
        self.last_print = 0.0
        self.best: tuple[float, dict, float] | None = None  # val_acc, config, val_loss

    def __getstate__(self) -> dict:
        """Ray pickles the Tuner with its callbacks (for --resume): streams and bars stay behind."""
        return {**self.__dict__, "out": None, "bar": None}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self.out = sys.__stdout__  # a resumed search: the process's console, not a redirected stream

    def on_trial_result(self, iteration: int, trials: list[Trial], trial: Trial, result: dict, **info) -> None:
        # the export's rule: highest val_acc, a tie going to the lower val_loss
        value, loss = result.get(M.VAL_ACC), result.get(M.VAL_LOSS, float("inf"))
        if value is None or loss != loss:  # NaN loss: a diverged trial
            return
        if self.best is None or (value, -loss) > (self.best[0], -self.best[2]):
            self.best = (value, dict(trial.config), loss)

    def on_trial_complete(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        self.print(trials, force=True)

    def on_trial_error(self, iteration: int, trials: list[Trial], trial: Trial, **info) -> None:
        self.print(trials, force=True)

    def on_experiment_end(self, trials: list[Trial], **info) -> None:
        self.print(trials, force=True)

    def on_step_end(self, iteration: int, trials: list[Trial], **info) -> None:
        self.print(trials)

    def counts(self, trials: list[Trial]) -> tuple[int, int, int, int]:
        """completed, stopped early, errored, running"""
        done = [t for t in trials if t.status == Trial.TERMINATED]
        stopped = sum(1 for t in done if (t.last_result or {}).get(M.EPOCH, 0) < self.max_epochs)
        running = sum(1 for t in trials if t.status == Trial.RUNNING)
        errored = sum(1 for t in trials if t.status == Trial.ERROR)
        return len(done) - stopped, stopped, errored, running

    def left(self) -> str:
        if self.time_left is None:
            return ""
        return f"; {time.strftime('%H:%M:%S', time.gmtime(max(0.0, self.time_left())))} of the budget left"

    def print(self, trials: list[Trial], force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last_print < self.every_s:
            return
        self.last_print = now
        completed, stopped, errored, running = self.counts(trials)
        elapsed = time.strftime("%H:%M:%S", time.gmtime(now - self.started))
        best = ""
        if self.best is not None:
            hp = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.best[1].items())
            best = f" | best val_acc {self.best[0]:.4f} ({hp})"
        print(f"[{elapsed}] trials {completed + stopped + errored}/{self.samples} done: "
              f"{completed} completed, {stopped} stopped early, {errored} errored; "
              f"{running} running{self.left()}{best}", file=self.out, flush=True)


class ProgressBar(StatusLine):
    """The same facts as a live tqdm bar, redrawn every second; for a terminal."""

    def __init__(self, samples: int, max_epochs: int, out: TextIO, time_left: Callable[[], float] | None = None) -> None:
        super().__init__(samples, max_epochs, every_s=1.0, out=out, time_left=time_left)
        self.bar = None

    def print(self, trials: list[Trial], force: bool = False) -> None:
        from tqdm import tqdm

        now = time.time()
        if not force and now - self.last_print < self.every_s:
            return
        self.last_print = now
        if self.bar is None:
            self.bar = tqdm(total=self.samples, file=self.out, unit="trial", dynamic_ncols=True,
                            bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} trials [{elapsed}] {postfix}")
        completed, stopped, errored, running = self.counts(trials)
        self.bar.n = completed + stopped + errored
        best = f"best val_acc {self.best[0]:.4f}" if self.best is not None else "no result yet"
        self.bar.set_postfix_str(f"{running} running, {best}{self.left()}", refresh=False)
        self.bar.refresh()

    def on_experiment_end(self, trials: list[Trial], **info) -> None:
        self.print(trials, force=True)
        if self.bar is not None:
            self.bar.close()


def progress(samples: int, max_epochs: int, out: TextIO, time_left: Callable[[], float] | None = None) -> StatusLine:
    """A bar where `out` is a terminal, plain lines where it is not."""
    if getattr(out, "isatty", lambda: False)():
        return ProgressBar(samples, max_epochs, out, time_left)
    return StatusLine(samples, max_epochs, out=out, time_left=time_left)
