"""Each dataset's experiment end to end: a smoke search, the export scored once on test, and the
search space's optimizer choice; bad user folders at the CLI."""
from __future__ import annotations

import json

import optuna
import pandas as pd
import pytest

from experiments import EXPERIMENTS
from search_spaces import SEARCH_SPACES
from tests.conftest import (
    BROKEN_FOLDERS,
    make_broken_folder,
    make_flat_folder,
    make_image_folder,
    make_mnist,
)
from tests.test_cli import one_line_error
from tuning.app.export import META_FILE
from tuning.app.results import RESULTS_FILE
from tuning.lib import metrics as M
from tuning.lib.data.sources import create_source
from tuning.predict import predict
from tuning.run import main

SMOKE = ["--smoke-test", "--samples", "1", "--epochs", "1"]


def search(name: str, data_root, storage, capsys) -> tuple[dict, str]:
    main([name, *SMOKE, "--data-root", str(data_root), "--storage", str(storage)])
    out = capsys.readouterr().out
    run_dir = next(p for p in storage.iterdir() if p.is_dir())
    meta = json.loads((run_dir / "best" / META_FILE).read_text())
    table = pd.read_parquet(run_dir / RESULTS_FILE)
    exported = table.loc[table["exported"], "test_acc"].tolist()  # the export's trials: one, or an ensemble's members
    assert exported and set(exported) == {meta["metrics"][M.TEST_ACC]}
    return meta, out


def check_test_score_by_predict(meta, export_dir, listing, out) -> None:
    """The export's test_acc is what the exported model says of the test files, and the summary says so."""
    paths = [item.ref for item in listing.splits["test"]]
    rows = predict(export_dir, paths)
    truth = [listing.classes[item.label] for item in listing.splits["test"]]
    accuracy = sum(label == want for (_, label, _), want in zip(rows, truth)) / len(paths)
    assert meta["metrics"][M.TEST_ACC] == pytest.approx(accuracy)
    assert f"test_acc: {accuracy:.4f}, test NLL " in out and f"({len(paths)} test images, scored once after the search)" in out


def test_hotdog_smoke_search(ray_session, tmp_path, capsys):
    make_image_folder(tmp_path / "data" / "hotdog", {"train": 12, "test": 10}, classes=("hotdog", "not-hotdog"))
    meta, out = search("hotdog", tmp_path / "data", tmp_path / "runs", capsys)
    assert meta["classes"] == ["hotdog", "not-hotdog"] and meta["image_mode"] == "RGB"
    listing = create_source("hotdog").list(tmp_path / "data", seed=0, per_class=8)
    check_test_score_by_predict(meta, tmp_path / "runs" / "hotdog" / "best", listing, out)


def test_pokemon_smoke_search(ray_session, tmp_path, capsys):
    counts = {"bulbasaur": 15, "charmander": 15, "mewtwo": 15, "pikachu": 15, "squirtle": 15}
    make_flat_folder(tmp_path / "data" / "pokemon", counts)
    meta, out = search("pokemon", tmp_path / "data", tmp_path / "runs", capsys)
    assert meta["classes"] == sorted(counts)
    listing = create_source("pokemon").list(tmp_path / "data", seed=0, per_class=8)
    check_test_score_by_predict(meta, tmp_path / "runs" / "pokemon" / "best", listing, out)


def test_user_folder_smoke_search(ray_session, tmp_path, capsys):
    make_flat_folder(tmp_path / "my photos", {"cat": 10, "dog": 10})
    meta, out = search(f"folder:{tmp_path / 'my photos'}", tmp_path / "unused", tmp_path / "runs", capsys)
    assert meta["experiment"] == "folder-my photos"
    listing = create_source(f"folder:{tmp_path / 'my photos'}").list(None, seed=0, per_class=8)
    check_test_score_by_predict(meta, tmp_path / "runs" / "folder-my photos" / "best", listing, out)


def test_mnist_smoke_search_takes_one_channel(ray_session, tmp_path, capsys):
    make_mnist(tmp_path / "data", n_train=200, n_test=60)
    meta, out = search("mnist", tmp_path / "data", tmp_path / "runs", capsys)
    assert meta["classes"] == [str(d) for d in range(10)]
    assert (meta["image_mode"], meta["gray_input"]) == ("L", "sum")
    assert "test_acc: " in out and "(60 test images, scored once after the search)" in out
    assert 0.0 <= meta["metrics"][M.TEST_ACC] <= 1.0


def test_every_recipe_is_a_point_of_its_search_space():
    """The recipe is enqueued as the first trial: its keys must be exactly the space's, its values
    inside it (an out-of-range value would be used, but warned about, and teach TPE nonsense)."""
    for name in EXPERIMENTS.names():
        experiment = EXPERIMENTS.get(name)
        study = optuna.create_study()
        study.enqueue_trial(experiment.recipe)
        trial = study.ask()
        SEARCH_SPACES.get(experiment.search_space)(trial, num_stages=9)
        assert trial.params == experiment.recipe, name
        for key, dist in trial.distributions.items():
            assert dist._contains(dist.to_internal_repr(experiment.recipe[key])), (name, key)


def test_lr_range_follows_the_optimizer():
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    seen = set()
    for _ in range(40):
        trial = study.ask()
        SEARCH_SPACES.get("finetune")(trial, num_stages=9)
        p = trial.params
        seen.add(p["optimizer"])
        high = 3e-2 if p["optimizer"] == "sgd" else 3e-3
        assert trial.distributions["lr"].high == high and p["lr"] <= high
        assert 1e-6 <= p["weight_decay"] <= 1e-2
        study.tell(trial, 0.5)
    assert seen == {"sgd", "adam"}


@pytest.mark.parametrize("breakage, message", BROKEN_FOLDERS)
def test_bad_user_folders_exit_2_naming_the_folder(cli, tmp_path, breakage, message):
    base = make_broken_folder(tmp_path / "mine", breakage)
    out = cli("tuning.run", f"folder:{base}", "--storage", str(tmp_path / "runs"))
    one_line_error(out, "tuning.run", message.format(base=base))
    assert not (tmp_path / "runs").exists()


def test_list_names_the_new_experiments_and_folder(cli):
    out = cli("tuning.run", "--list")
    assert out.returncode == 0
    for name in ("hotdog", "hymenoptera", "mnist", "pokemon", "folder:PATH"):
        assert name in out.stdout
