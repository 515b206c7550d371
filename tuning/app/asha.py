"""ASHA that exempts the seeds' recipe from its rungs, and stops any trial on a plateau.

The recipe is enqueued first so that the search never ends worse than the hand-tuned tutorial
(README). ASHA on compute (tuning.lib.cost) judges it after its first full fine-tuning epoch
against what cheap deep trials reached with the same compute, and full fine-tuning often dips in
its first epoch: on a digits proxy ASHA stopped the seeds' Adam recipe there, though run out it
ends best. So the recipe runs all its epochs; its scores still enter the rungs, so the other
trials are judged against it as before. Exempting only its first epoch was tried and stopped the
recipe at its second (benchmarks/README.md, anytime).

Every trial, the recipe too, also stops on a plateau: once `Experiment.patience` whole epochs
passed without a new best of its own (its best epoch stays, as any stopped trial's), even one
that holds the search's best, which would otherwise run on with a slot to itself while nobody
matches it. ASHA alone cannot do this: a rung's first arrivals pass it, and few trials ever reach
the last rung (3 full epochs of compute). Patience is capped in compute as well
(`Experiment.patience_cost`, full fine-tuning epochs), so a full fine-tune stops after two stale
epochs and a cheaper depth 4-5 trial, whose late bests the search needs, after three. Trials
whose epochs cost less than the first rung (deep ones, a few seconds each) are left to run, as
ASHA leaves them. In a 3-epoch search (MNIST, the 8 x 3 benchmarks) only `patience_cost` can stop
a trial before its last epoch. The runs behind each rule: benchmarks/README.md, anytime."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ray.tune.schedulers import ASHAScheduler, TrialScheduler

from experiments.base import Experiment
from tuning.lib import metrics as M


@dataclass
class Progress:
    best: float  # in ASHA's sign: higher is better
    stale: int = 0  # whole epochs since its best


class RecipeKeepingASHA(ASHAScheduler):
    def __init__(self, *, experiment: Experiment, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._experiment = experiment
        self._progress: dict[str, Progress] = {}

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict) -> str:
        action = super().on_trial_result(tune_controller, trial, result)
        score = result.get(self._metric)
        if score is None or not self._metric_op:
            return action
        if self._plateaued(trial.trial_id, self._metric_op * score, result):
            if action != TrialScheduler.STOP:
                self._num_stopped += 1
            return TrialScheduler.STOP
        spent = result.get(self._time_attr)
        if self._experiment.is_recipe(trial.config) and action == TrialScheduler.STOP and spent is not None \
                and spent < self._max_t:
            self._num_stopped -= 1
            return TrialScheduler.CONTINUE
        return action

    def _plateaued(self, trial_id: str, score: float, result: dict) -> bool:
        """`Experiment.patience` whole epochs without a new best of its own, or fewer that cost
        `Experiment.patience_cost` full fine-tuning epochs (a report at a rung inside an epoch
        counts as a score, not as an epoch). A trial whose epochs cost less than the first rung is
        left alone, as ASHA leaves it: stopping one saves seconds and may cost its late best
        (anytime-32x8-145818d-01a5ee6.json)."""
        progress = self._progress.get(trial_id)
        if progress is None or score > progress.best:
            progress = self._progress[trial_id] = Progress(score)
        elif float(result.get(M.EPOCH, 1)).is_integer():
            progress.stale += 1
        cost, epoch = result.get(self._time_attr), result.get(M.EPOCH)
        per_epoch = cost / epoch if cost is not None and epoch else None
        if per_epoch is not None and per_epoch < self._experiment.grace_period:
            return False  # a cheap trial
        spent = progress.stale * (per_epoch or 0.0)  # compute since its best, counted in whole epochs
        waited = progress.stale >= self._experiment.patience or spent >= self._experiment.patience_cost - 1e-9
        return waited
