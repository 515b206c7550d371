"""What a person steers a search with beyond the experiment and where it runs: a time budget,
a warm start, and where our own console lines go. `build_tuner` reads it."""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TextIO

import optuna
from ray import tune
from ray.tune.search import Searcher

from experiments.base import Experiment
from tuning.app.budget import Budget, BudgetedSearcher, BudgetStopper
from tuning.app.progress import StatusLine, progress


@dataclass(frozen=True)
class Steering:
    budget: Budget | None = None
    warm: optuna.storages.BaseStorage | None = None  # an Optuna study seeded with an earlier run's trials
    console: TextIO = field(default_factory=lambda: sys.stdout)  # where our progress goes

    def searcher(self, searcher: Searcher, experiment: Experiment) -> Searcher:
        if self.budget is None:
            return searcher
        return BudgetedSearcher(searcher, self.budget)

    def stopper(self) -> tune.Stopper | None:
        return BudgetStopper(self.budget) if self.budget is not None else None

    def progress(self, experiment: Experiment) -> StatusLine:
        time_left = self.budget.remaining if self.budget is not None else None
        return progress(experiment.samples, experiment.epochs, self.console, time_left)
