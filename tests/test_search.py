"""A real search on the tiny dataset: Optuna + ASHA on a local Ray, export, predict, TensorBoard."""
from __future__ import annotations

import json
from pathlib import Path

import optuna
import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from search_spaces import SEARCH_SPACES
from tests.conftest import trial_dirs
from tuning.app.export import META_FILE
from tuning.lib import metrics as M
from tuning.predict import predict
from tuning.run import main


def progress(trial_dir: Path) -> pd.DataFrame:
    return pd.read_csv(trial_dir / "progress.csv")


def configs_in_creation_order(run_dir: Path) -> list[dict]:
    (state_file,) = run_dir.glob("experiment_state-*.json")
    trials = [json.loads(t[0]) for t in json.loads(state_file.read_text())["trial_data"]]
    trials.sort(key=lambda t: int(t["experiment_tag"].split("_")[0]))  # Ray numbers trials from 1
    return [t["config"] for t in trials]


def test_every_sample_ran_and_the_recipe_ran_first(finished_run, tiny_experiment):
    assert len(trial_dirs(finished_run)) == tiny_experiment.samples
    configs = configs_in_creation_order(finished_run)
    assert configs[0] == tiny_experiment.recipe
    assert len({json.dumps(c, sort_keys=True) for c in configs}) == tiny_experiment.samples


def test_asha_stopped_some_trials_before_the_last_epoch(finished_run, tiny_experiment):
    epochs = [progress(d)[M.EPOCH].max() for d in trial_dirs(finished_run)]
    assert min(epochs) < tiny_experiment.epochs, epochs
    assert max(epochs) == tiny_experiment.epochs, epochs


def test_tensorboard_holds_val_acc_for_every_trial(finished_run):
    for d in trial_dirs(finished_run):
        acc = EventAccumulator(str(d)).Reload()
        values = [e.value for e in acc.Scalars("val/acc")]
        assert values == pytest.approx(progress(d)[M.VAL_ACC].tolist())


def test_export_is_made_of_reported_epochs_and_reproduces_its_val_accuracy(finished_run, tiny_root):
    """Each member of the export is a report a trial made (or the probe), with that report's
    val_acc; the export's own val_acc is what it predicts on the val images."""
    meta = json.loads((finished_run / "best" / META_FILE).read_text())
    probe = json.loads((finished_run / "probe.json").read_text())["metrics"][M.VAL_ACC]
    for member in meta["final"]["members"]:
        if member["trial_id"] == "probe":
            assert member["val_acc"] == pytest.approx(probe)
            continue
        trial = progress(finished_run / f"trial_{member['trial_id']}")
        report = trial[trial[M.EPOCH] == member["epoch"]]
        assert len(report) == 1 and report[M.VAL_ACC].iloc[0] == pytest.approx(member["val_acc"])
    images = sorted((tiny_root / "tiny" / "val").rglob("*.*"))
    rows = predict(finished_run / "best", images)
    correct = sum(label == path.parent.name for (_, label, _), path in zip(rows, images))
    assert correct / len(images) == pytest.approx(meta["metrics"][M.VAL_ACC])


def test_a_second_run_into_the_same_dir_is_refused(finished_run, tiny_root, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["tiny", "--data-root", str(tiny_root), "--storage", str(finished_run.parent)])
    assert exit_info.value.code == 2
    assert "exists" in capsys.readouterr().err


def test_search_space_suggests_within_bounds():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    space = SEARCH_SPACES.get("finetune")
    for _ in range(20):
        trial = study.ask()
        space(trial, num_stages=5)
        p = trial.params
        low, high = (1e-5, 3e-2) if p["optimizer"] == "sgd" else (1e-6, 3e-3)
        assert low <= p["lr"] <= high and 1 <= p["head_lr_mult"] <= 100
        assert 0 <= p["freeze_depth"] <= 5 and p["batch_size"] in (8, 16, 32, 64)
        study.tell(trial, 0.5)


def test_trials_ran_side_by_side(finished_run):
    """OptunaSearch once kept a single trial pending (field notes): two slots must both be busy.
    Each trial's span runs from its first epoch's start to its last report."""
    spans = []
    for d in trial_dirs(finished_run):
        rows = progress(d)
        spans.append((rows["timestamp"].iloc[0] - rows["time_this_iter_s"].iloc[0], rows["timestamp"].iloc[-1]))
    overlaps = [min(a[1], b[1]) - max(a[0], b[0]) for i, a in enumerate(spans) for b in spans[i + 1 :]]
    assert max(overlaps) > 0, spans
