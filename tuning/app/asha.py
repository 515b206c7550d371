"""ASHA that exempts the seeds' recipe from its rungs, and stops any trial on a plateau.

The recipe is enqueued first so that the search never ends worse than the hand-tuned tutorial
(README). ASHA on compute (tuning.lib.cost) judges it after its first full fine-tuning epoch
against what cheap deep trials reached with the same compute, and full fine-tuning often dips in
its first epoch: on the digits proxy (MNIST, 4 samples x 3 epochs) the seeds' Adam recipe stood at
val 0.700 after epoch 1 against a head-only trial's 0.921 and was stopped (the search ended at val
0.921); run out, it reaches val 0.971 by epoch 3. So the recipe runs all its epochs; its
scores still enter the rungs, so the other trials are judged against it as before. Exempting only
its first epoch (263410d) was tried: on the same proxy, seed 1, ASHA stopped the recipe at its
second epoch (138/140 against a head-only trial's 143 at the 1/3 rung) and the search ended at the
probe, test 0.9471 instead of 0.9773; on hymenoptera it would have saved the recipe's 411-425 s
slot (it falls from 145/153 to 138 over 8 epochs).

Every trial, the recipe too, also stops on a plateau: once `Experiment.patience` whole epochs
passed without a new best of its own (its best epoch stays, as any stopped trial's), even one
that holds the search's best: until 592ac15 such a trial ran on while nobody matched it, and in
the 8 x 3 hymenoptera searches (seeds 0-2) the recipe, leading with 146 at its first report, ran
its third epoch (137-141) as the last 25-30 s of the search with the other slot idle; without
that epoch two runs each took 117 / 145 / 112 s and 114 / 132 / 92 s (135 / 139 / 129 s
before), at the same best 0.9542. ASHA alone cannot do this: a rung's first arrivals pass
it, and few trials ever reach the last rung (3 full epochs of compute). In the 32-sample
hymenoptera search at 145818d the recipe scored 146 (a rung inside its first epoch), 145, 140,
141, 140, ... over all 8 epochs (255 s), tied with a deep trial's 146, and a depth-2 trial scored
146 at half an epoch, then 145 to 138, and held a slot for 281 s: the first at rung 3, it passed
against the recipe's 141. Patience 3, not 2: the search's best (147) came from a depth-4 trial at
its third epoch after 146, 146, 145. Trials whose epochs cost less than the first rung (deep
ones, a few seconds each) are left to run, as ASHA leaves them. In a 3-epoch search (MNIST, the
8 x 3 benchmarks) only `patience_cost` can stop a trial before its last epoch. Tried first (a2bba97):
patience 2 for the recipe alone and only while another trial was strictly better: with the
recipe's 146 tied, it ran its 8 epochs. At 3399a93 the recipe and that depth-2 trial stopped after
their third epoch (111 s and 115 s) and the search took 369 s, ending at 0.9608. Since then
patience is capped in compute as well (`Experiment.patience_cost`, 1.5 full fine-tuning epochs):
the recipe and depth-2 trials stop after two stale epochs, depth 4-5 trials still after three."""
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
        left alone, as ASHA leaves it: stopping one saves seconds and may cost its late best (at
        01a5ee6, which stopped deep trials after 4-6 epochs too, the 32-sample search ended at
        0.9542 in 378 s)."""
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
