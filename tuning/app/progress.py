"""One concise status line while a search runs, instead of Ray's wall of tables (--verbose)."""
from __future__ import annotations

import sys
import time

from ray.tune import Callback
from ray.tune.experiment import Trial

from tuning.lib import metrics as M


class StatusLine(Callback):
    def __init__(self, samples: int, max_epochs: int, every_s: float = 15.0) -> None:
        self.samples, self.max_epochs, self.every_s = samples, max_epochs, every_s
        self.started = time.time()
        self.last_print = 0.0
        self.best: tuple[float, dict, float] | None = None  # val_acc, config, val_loss

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

    def print(self, trials: list[Trial], force: bool = False) -> None:
        now = time.time()
        if not force and now - self.last_print < self.every_s:
            return
        self.last_print = now
        done = [t for t in trials if t.status == Trial.TERMINATED]
        stopped = sum(1 for t in done if (t.last_result or {}).get(M.EPOCH, 0) < self.max_epochs)
        running = sum(1 for t in trials if t.status == Trial.RUNNING)
        errored = sum(1 for t in trials if t.status == Trial.ERROR)
        elapsed = time.strftime("%H:%M:%S", time.gmtime(now - self.started))
        best = ""
        if self.best is not None:
            hp = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in self.best[1].items())
            best = f" | best val_acc {self.best[0]:.4f} ({hp})"
        print(f"[{elapsed}] trials {len(done) + errored}/{self.samples} done: "
              f"{len(done) - stopped} completed, {stopped} stopped early, {errored} errored; "
              f"{running} running{best}", file=sys.stdout, flush=True)
