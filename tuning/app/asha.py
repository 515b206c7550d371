"""ASHA whose rungs also count what cheaper trials reached with less compute.

ASHA judges a trial when its compute reaches a rung, against the trials recorded at that rung. A
deep trial (only the head, or the last stages, on cached features) costs almost nothing
(tuning.lib.cost): it ends all its epochs below the first rung and so is never recorded there.
Plain ASHA then judged the expensive shallow trials only against each other: on hymenoptera, 32 x 8,
the seeds' recipe was the first at every rung and ran all 8 epochs (516 s), as did two other
shallow trials (541 s each), none of them beating head-only trials that had taken 3 s each.

Here a rung's cutoff is taken over the trials recorded at it and, for every other trial whose
compute is still below the rung, the best score it has reached so far: a score had with less
compute than the rung's is one the rung's compute could have bought. A trial counted that way is
still judged itself when it reaches the rung."""
from __future__ import annotations

from typing import Any

import numpy as np
from ray.tune.schedulers import ASHAScheduler
from ray.tune.schedulers.async_hyperband import _Bracket


class _Reached(dict):
    """trial id -> (compute spent, best score so far, signed so that higher is better)."""

    def note(self, trial_id: str, spent: float, score: float) -> None:
        best = max(score, self[trial_id][1]) if trial_id in self else score
        self[trial_id] = (spent, best)

    def below(self, milestone: float, recorded: dict) -> list[float]:
        return [best for trial_id, (spent, best) in self.items() if spent < milestone and trial_id not in recorded]


class _EqualComputeBracket(_Bracket):
    def __init__(self, *args: Any, reached: _Reached, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._reached = reached

    def cutoff(self, recorded: dict) -> float | None:
        milestone = next(m for m, rung in self._rungs if rung is recorded)
        scores = [*recorded.values(), *self._reached.below(milestone, recorded)]
        if not scores:
            return None
        return float(np.nanpercentile(scores, (1 - 1 / self.rf) * 100))


class EqualComputeASHA(ASHAScheduler):
    def __init__(self, *, time_attr: str, metric: str, mode: str, max_t: float, grace_period: float,
                 reduction_factor: float) -> None:
        super().__init__(time_attr=time_attr, metric=metric, mode=mode, max_t=max_t, grace_period=grace_period,
                         reduction_factor=reduction_factor)
        self._reached = _Reached()
        self._brackets = [_EqualComputeBracket(grace_period, max_t, reduction_factor, 0, reached=self._reached)]

    def _note(self, trial_id: str, result: dict) -> None:
        if self._time_attr in result and self._metric in result and result[self._metric] is not None:
            self._reached.note(trial_id, result[self._time_attr], self._metric_op * result[self._metric])

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        self._note(trial.trial_id, result)
        return super().on_trial_result(tune_controller, trial, result)

    def on_trial_complete(self, tune_controller: Any, trial: Any, result: dict) -> None:
        self._note(trial.trial_id, result)
        super().on_trial_complete(tune_controller, trial, result)
