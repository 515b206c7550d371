"""`--time-budget 10m`: the best search that fits a wall-clock budget (as AutoGluon's time_limit).

The budget runs from the command's process start (`tuning.run`; in the API, from the
`tuning.search` call) and covers everything after it. Three rules keep within it:
- a new trial starts only if it can reach its first ASHA rung (the grace period, where trials are
  first compared) before the search stops: its cost is estimated as the fastest any trial so far
  reached that rung, start-up included (`BudgetedSearcher`). Before any trial got there, nothing is
  known and trials start;
- at the stop time every running trial is stopped (`BudgetStopper`); its checkpoints stay, so the
  best epoch found is still exported;
- the stop time leaves `wrap_up_s` for what follows the search: export, the test score, results,
  and Ray's shutdown as the command exits.
"""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, field
from typing import Any

from ray.tune import Stopper
from ray.tune.search import Searcher

from tuning.lib.errors import UsageError

UNITS = {"s": 1, "m": 60, "h": 3600}


def parse_duration(text: str | float | int) -> float:
    """`90s`, `10m`, `1.5h`, or a bare number of seconds; positive."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*(\d+(?:\.\d*)?)\s*([smh]?)\s*", str(text).lower())
        if not match:
            raise UsageError(f"--time-budget {text!r} is not a duration; write it as 90s, 10m or 1h")
        seconds = float(match.group(1)) * UNITS[match.group(2) or "s"]
    if not seconds > 0:
        raise UsageError(f"--time-budget must be positive, got {text!r}")
    return seconds


@dataclass(frozen=True)
class Budget:
    seconds: float
    started: float = field(default_factory=time.time)  # the command's start (tuning.run), else the search call's
    # export, test score, results.parquet and Ray's shutdown as the command exits all come after
    # the search (a measured command: benchmarks/README.md, "By hand")
    wrap_up_s: float = 15.0

    @property
    def stop_at(self) -> float:
        return self.started + max(self.seconds - self.wrap_up_s, 0.5 * self.seconds)

    def remaining(self, now: float | None = None) -> float:
        return self.stop_at - (time.time() if now is None else now)

    def ended(self, trials: int, samples: int) -> bool:
        """Whether the budget, not the number of samples, ended the search."""
        return trials < samples or self.remaining() <= 0


class BudgetStopper(Stopper):
    """Stops every running trial at the budget's stop time."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget

    def __call__(self, trial_id: str, result: dict) -> bool:
        return self.budget.remaining() <= 0

    def stop_all(self) -> bool:
        return self.budget.remaining() <= 0


class BudgetedSearcher(Searcher):
    """Wraps the real searcher: suggests nothing more once a new trial could not reach its first
    report in the time left (ASHA judges by compute, tuning.lib.cost: a trial's first report, at
    its first epoch's end or at a rung inside it, is the first point where it can show anything);
    everything else is the wrapped searcher's."""

    def __init__(self, searcher: Searcher, budget: Budget) -> None:
        super().__init__(metric=searcher.metric, mode=searcher.mode)
        self.searcher, self.budget = searcher, budget
        self.fastest_rung_s: float | None = None  # seconds the quickest trial took to its first report

    def trial_cost(self) -> float:
        return self.fastest_rung_s or 0.0

    def suggest(self, trial_id: str) -> dict | str | None:
        if self.budget.remaining() <= self.trial_cost():
            return Searcher.FINISHED
        return self.searcher.suggest(trial_id)

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if result.get("training_iteration") == 1 and "time_total_s" in result:
            seconds = float(result["time_total_s"])
            self.fastest_rung_s = seconds if self.fastest_rung_s is None else min(self.fastest_rung_s, seconds)
        self.searcher.on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        self.searcher.on_trial_complete(trial_id, result=result, error=error)

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        return self.searcher.set_search_properties(metric, mode, config, **spec)

    def set_max_concurrency(self, max_concurrent: int) -> bool:
        return self.searcher.set_max_concurrency(max_concurrent)

    def add_evaluated_point(self, *args: Any, **kwargs: Any) -> None:
        self.searcher.add_evaluated_point(*args, **kwargs)

    def get_state(self) -> dict:
        """This wrapper's own state; Ray saves the wrapped searcher separately (as for ConcurrencyLimiter)."""
        return {"fastest_rung_s": self.fastest_rung_s}

    def set_state(self, state: dict) -> None:
        self.fastest_rung_s = state.get("fastest_rung_s")

    def save(self, checkpoint_path: str) -> None:
        self.searcher.save(checkpoint_path)

    def restore(self, checkpoint_path: str) -> None:
        self.searcher.restore(checkpoint_path)

    def on_pause(self, trial_id: str) -> None:
        self.searcher.on_pause(trial_id)

    def on_unpause(self, trial_id: str) -> None:
        self.searcher.on_unpause(trial_id)
