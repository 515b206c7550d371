"""TPE whose start-up trials come cheap first and still cover the space.

TPE starts with random trials; a random freeze depth is as likely to be the most expensive (0:
the whole network trains) as the cheapest (only the head). Here the start-up trials take the
depths from the deepest (cheapest, and sharing the most cached work) to the shallowest, one each,
with every other hyperparameter random as before; so the first results come soon, and by the end
of start-up every depth has been tried once (a backbone with more stages than TPE's start-up
trials stretches it to one trial per depth). The depth the seeds' recipe (trial 0) trains at is
not repeated: on hymenoptera that was a second, costly full fine-tuning trial that scored below the
recipe. After that TPE chooses as usual.

Tried and not kept: every other depth (9, 7, 5, 3, 1) and TPE from the 7th trial. It halved the
start-up, but with six results TPE went on to pick expensive shallow depths, and the search got
slower and no better (benchmarks/results/anytime-stride-1ed21e1.json,
search-ours-stride-1ed21e1.json; benchmarks/README.md)."""
from __future__ import annotations

from typing import Any

from optuna.distributions import BaseDistribution, IntDistribution
from optuna.samplers import TPESampler
from optuna.study import Study
from optuna.trial import FrozenTrial

DEPTH = "freeze_depth"


class CheapFirstTPE(TPESampler):
    def __init__(self, *, seed: int | None = None, n_startup_trials: int = 10, recipe_depth: int | None = None) -> None:
        super().__init__(seed=seed, n_startup_trials=n_startup_trials)
        self._recipe_depth = recipe_depth

    def sample_independent(
        self, study: Study, trial: FrozenTrial, param_name: str, param_distribution: BaseDistribution
    ) -> Any:
        forced = cheap_first(trial.number, param_name, param_distribution, self._recipe_depth)
        if forced is not None:
            return forced
        return super().sample_independent(study, trial, param_name, param_distribution)

    def sample_relative(
        self, study: Study, trial: FrozenTrial, search_space: dict[str, BaseDistribution]
    ) -> dict[str, Any]:
        """TPE samples jointly once start-up is over; the cheap-first depths still win where due."""
        params = super().sample_relative(study, trial, search_space)
        for name, distribution in search_space.items():
            forced = cheap_first(trial.number, name, distribution, self._recipe_depth)
            if forced is not None:
                params[name] = forced
        return params


def cheap_first(number: int, name: str, distribution: BaseDistribution, recipe_depth: int | None = None) -> int | None:
    """Trial 0 is the enqueued recipe; the next trials take each other depth once, deepest (cheapest) first."""
    if name != DEPTH or not isinstance(distribution, IntDistribution):
        return None
    depths = [d for d in range(distribution.high, distribution.low - 1, -1) if d != recipe_depth]
    return depths[number - 1] if 1 <= number <= len(depths) else None
