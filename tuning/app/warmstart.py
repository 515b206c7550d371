"""`--warm-start RUN_DIR`: an earlier run's finished trials seed the new search's Optuna study.

Ray's OptunaSearch cannot do this with a define-by-run space: it rejects `evaluated_rewards`
(ray #18587) and has ignored `points_to_evaluate` (#35319). So the study is built here: each old
trial is replayed through the search space (to get its distributions), added as a finished trial
(`optuna.trial.create_trial`), and the storage holding the study is handed to OptunaSearch, which
loads it by name (`load_if_exists`) and samples with TPE from there: a second search on grown data
starts from what the first learned.

The runs must share the search space: the same space by name and the same number of backbone
stages (freeze depth's range); anything else would feed TPE points from another space."""
from __future__ import annotations

import math
from pathlib import Path

import optuna

from experiments.base import Experiment
from search_spaces import space_for
from tuning.app import results
from tuning.app.location import RunLocation, parse_run_dir
from tuning.app.probing import PROBE_ID
from tuning.app.rundir import SPEC_FILE, load_spec
from tuning.lib import metrics as M
from tuning.lib.backbones import BACKBONES
from tuning.lib.errors import UsageError

# the name OptunaSearch gives its study, and under which it loads an existing one
STUDY_NAME = "optuna"


def location_of(run_dir: str | Path) -> RunLocation:
    return parse_run_dir(str(run_dir))


def check_same_space(old: Experiment, new: Experiment, where: str) -> None:
    if old.search_space != new.search_space:
        raise UsageError(f"--warm-start {where} searched space {old.search_space!r}, this search {new.search_space!r}")
    was, now = BACKBONES.get(old.backbone).num_stages, BACKBONES.get(new.backbone).num_stages
    if was != now:
        raise UsageError(f"--warm-start {where} used backbone {old.backbone} ({was} stages), this search "
                         f"{new.backbone} ({now}): freeze_depth ranges differ, so the search spaces do")


def finished_trials(run_dir: str | Path, experiment: Experiment) -> list[tuple[dict, float]]:
    """(hyperparameters, best val_acc) of each trial of the earlier run that reported a result."""
    location = location_of(run_dir)
    location.pull(SPEC_FILE)
    if not (location.local / SPEC_FILE).is_file():
        raise UsageError(f"--warm-start {location.uri} is not a run dir (no {SPEC_FILE})")
    old, _ = load_spec(location.local)
    check_same_space(old, experiment, location.uri)
    table = results.collect(location)
    hp_cols = [c for c in table.columns if c.startswith("hp_")]
    points = []
    for _, row in table.iterrows():
        if row["trial_id"] == PROBE_ID:  # the linear probe is no point of the search space
            continue
        value = row["best_val_acc"]
        if value is not None and isinstance(value, float) and math.isfinite(value):
            points.append(({c[3:]: _plain(row[c]) for c in hp_cols}, float(value)))
    return points


def _plain(value):
    """numpy scalars from the parquet table -> Python values, as the space suggests them."""
    return value.item() if hasattr(value, "item") else value


def seeded_storage(experiment: Experiment, points: list[tuple[dict, float]]) -> optuna.storages.BaseStorage:
    """An in-memory storage holding the study OptunaSearch will load, with the old trials in it."""
    storage = optuna.storages.InMemoryStorage()
    study = optuna.create_study(storage=storage, study_name=STUDY_NAME,
                                direction="maximize" if M.MODE == "max" else "minimize")
    space = space_for(experiment)
    for params, value in points:
        replay = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
        replay.enqueue_trial(params)
        trial = replay.ask()
        space(trial)  # the space's own distributions for these values (branches included)
        if any(trial.params[k] != params.get(k) for k in trial.params):
            continue  # a value outside this space's range: not a point of this space
        study.add_trial(optuna.trial.create_trial(params=trial.params, distributions=trial.distributions, value=value))
    return storage


def warm_storage(run_dir: str | Path, experiment: Experiment) -> tuple[optuna.storages.BaseStorage, int]:
    """The storage to hand to OptunaSearch, and how many trials it holds."""
    storage = seeded_storage(experiment, finished_trials(run_dir, experiment))
    study = optuna.load_study(study_name=STUDY_NAME, storage=storage)
    return storage, len(study.trials)
