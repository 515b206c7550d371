"""What keeps a search resumable after its driver is killed at any moment, also between uploads.

Ray snapshots the trials (`experiment_state-*.json`) and the search algorithm (`search_gen_state-*`,
`searcher-state-*`) into one staging folder and copies it to the run dir in the background; in a
bucket each file is a separate upload. A driver killed in the middle of that copy leaves a trial
list and a searcher from different moments. The trial list is the one Ray restores, so it is the
authority here: the searcher tolerates trials it never saw, and the count of trials created is
taken from the trial list, so a resumed search ends with exactly `--samples` trials."""
from __future__ import annotations

import glob
import json
import os

from ray.tune.search import ConcurrencyLimiter, SearchGenerator, Searcher
from ray.tune.search.optuna import OptunaSearch

STATE_GLOB = "experiment_state-*.json"


def known_trials(state_text: str | bytes) -> list[str]:
    """The trial ids an experiment state file lists (its trials, finished or not)."""
    return [json.loads(trial)["trial_id"] for trial, _ in json.loads(state_text)["trial_data"]]


class ResumableOptunaSearch(OptunaSearch):
    """OptunaSearch that survives a resume in which a restored trial is unknown to it (its
    snapshot is older than the trial list's): such a trial runs on, the searcher learns nothing
    from it; before, its first result ended the resumed search with a KeyError."""

    def on_trial_result(self, trial_id: str, result: dict) -> None:
        if trial_id in self._ot_trials:
            super().on_trial_result(trial_id, result)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if trial_id in self._ot_trials:
            super().on_trial_complete(trial_id, result, error)


class TrialCountingGenerator(SearchGenerator):
    """Ray's SearchGenerator, whose count of trials created is restored from the trial list.

    With a searcher snapshot older than the trial list, Ray's own count is too low and the
    resumed search ran one trial more than --samples (seen: `trials: 5` for `--samples 4`); with a
    newer one (a trial started after the last trial list, whose dir `--resume` prunes) it is too
    high and that trial would not be redone, while the concurrency limit counted it as running
    for ever (with one trial at a time, the resumed search would wait for it)."""

    def restore_from_dir(self, dirpath: str) -> None:
        super().restore_from_dir(dirpath)
        states = sorted(glob.glob(os.path.join(dirpath, STATE_GLOB)))
        if not states:
            return
        with open(states[-1], "rb") as f:  # the newest, as Ray restores it (by name: a timestamp)
            known = known_trials(f.read())
        self._counter = len(known)
        limiter = self.searcher
        while limiter is not None and not isinstance(limiter, ConcurrencyLimiter):
            limiter = getattr(limiter, "searcher", None)
        if limiter is not None:
            gone = limiter.live_trials - set(known)
            limiter.live_trials -= gone
            limiter.num_unfinished_live_trials = max(0, limiter.num_unfinished_live_trials - len(gone))


def search_algorithm(searcher: Searcher, max_concurrent: int) -> TrialCountingGenerator:
    """What `tune.run` builds from a Searcher and `max_concurrent_trials`, with our generator."""
    return TrialCountingGenerator(ConcurrencyLimiter(searcher, max_concurrent=max_concurrent))
