"""ASHA that lets the seeds' recipe through its first epoch.

The recipe is enqueued first so that the seeds' hand-tuned configuration is always evaluated
(README). ASHA on compute (tuning.lib.cost) judges it after its first full fine-tuning epoch
against what cheap deep trials reached with the same compute, and full fine-tuning often dips in
its first epoch: on the digits proxy (MNIST, 4 samples x 3 epochs) the seeds' Adam recipe stood at
val 0.700 after epoch 1 against a head-only trial's 0.921 and was stopped (the search ended at val
0.921); run out, it reaches val 0.971 by epoch 3. So the recipe is not stopped after its first
epoch; from its next rung on it is judged like every trial. Exempting it at every rung cost the
32-sample hymenoptera search a slot for 411 s (8 epochs at depth 0) while its val_acc fell from
145/153 after epoch 1 to 138 (f6db634). Its scores enter the rungs either way, so the other trials
are judged against it."""
from __future__ import annotations

from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from experiments.base import Experiment
from tuning.lib import metrics as M


class RecipeKeepingASHA(ASHAScheduler):
    def __init__(self, *, experiment: Experiment, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._experiment = experiment

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        spent = result.get(self._time_attr)
        first_epoch = result.get(M.EPOCH) == 1
        if (action == TrialScheduler.STOP and first_epoch and self._experiment.is_recipe(trial.config)
                and spent is not None and spent < self._max_t):
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action
