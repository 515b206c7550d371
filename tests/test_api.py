"""The Python API: `tuning.search` as a notebook would call it, twice in one process, and
`tuning.load(...).predict` against `python -m tuning.predict`."""
from __future__ import annotations

import contextlib
import csv
import dataclasses
import io
import json
import subprocess
import sys

import pandas as pd
import pytest
import ray

import tuning
from tests.conftest import make_image_folder


@pytest.fixture(scope="module")
def two_searches(ray_session, tiny_root, tiny_experiment, tmp_path_factory):
    """A `folder:PATH` search with a test split, then an `Experiment` built in Python, in one process;
    what they print is kept as a notebook cell would show it (stdout is no terminal)."""
    node = ray.get_runtime_context().get_node_id()
    folder = make_image_folder(tmp_path_factory.mktemp("own") / "mine", {"train": 6, "val": 4, "test": 4})
    storage = tmp_path_factory.mktemp("api-runs")
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        first = tuning.search(f"folder:{folder}", smoke_test=True, samples=2, epochs=1, storage=str(storage), seed=1)
        second = tuning.search(dataclasses.replace(tiny_experiment, samples=2, epochs=1), storage=str(storage),
                               name="second", data_root=str(tiny_root), seed=2)
    return first, second, folder, node, printed.getvalue()


def test_two_searches_in_one_process_reuse_ray(two_searches):
    first, second, _, node, printed = two_searches
    assert first.export_dir != second.export_dir and first.trials == second.trials == 2
    assert ray.is_initialized() and ray.get_runtime_context().get_node_id() == node  # never restarted
    assert "trials 2/2 done" in printed and "\r" not in printed and "\x1b[" not in printed


def test_result_fields_match_results_and_export(two_searches):
    for result, has_test in zip(two_searches[:2], (True, False)):
        table = result.results
        meta = json.loads((result.export_dir / "model.json").read_text())
        # best_*: the best single report; the export is the final model made from the candidates
        best = table[table["best_val_acc"] == table["best_val_acc"].max()]
        assert result.best_val_acc == table["best_val_acc"].max() and result.best_trial_id in best["trial_id"].tolist()
        members = {m["trial_id"] for m in meta["final"]["members"]}
        assert set(table.loc[table["exported"], "trial_id"]) == members
        assert result.final_model.startswith("final model: ") and f"val_acc {meta['metrics']['val_acc']:.4f}" in result.final_model
        lead = table[table["trial_id"] == max(meta["final"]["members"], key=lambda m: m["weight"])["trial_id"]].iloc[0]
        # the lead member's own hyperparameters (the linear probe's row has only its own two)
        hparams = {c[3:]: lead[c] for c in table.columns if c.startswith("hp_") and not pd.isna(lead[c])}
        assert meta["hparams"] == hparams
        assert len(table) == result.trials + 1  # the trials and the linear probe
        assert table["trial_id"].iloc[0] == "probe"
        if has_test:
            assert result.test_acc is not None and result.test_acc == meta["metrics"]["test_acc"] == lead["test_acc"]
            assert result.test_nll == meta["metrics"]["test_nll"] and 0 <= result.test_ece <= 1
            assert result.test_images == 8
        else:
            assert result.test_acc is None and "test_acc" not in meta["metrics"]


def test_load_predict_equals_the_predict_command(two_searches, tmp_path):
    first, _, folder, _, _ = two_searches
    files = sorted((folder / "val").rglob("*.*"))
    ours = tuning.load(first.export_dir).predict(files)
    assert first.predict(files) == ours
    out = tmp_path / "p.csv"
    cli = subprocess.run([sys.executable, "-m", "tuning.predict", str(first.export_dir), str(folder / "val"),
                          "--csv", str(out), "--batch-size", "3"], capture_output=True, text=True, timeout=900)
    assert cli.returncode == 0, cli.stderr
    lines = [line.split("\t") for line in cli.stdout.strip().splitlines()]
    assert [p for p, _, _ in lines] == [str(f) for f in files]  # the folder, recursively, sorted
    assert [(label, prob) for _, label, prob in lines] == [(label, f"{p:.4f}") for label, p in ours]
    rows = list(csv.DictReader(out.open()))
    assert [r["path"] for r in rows] == [str(f) for f in files]
    assert all(r["label"] == label and abs(float(r["probability"]) - p) < 1e-6 for r, (label, p) in zip(rows, ours))


def test_bad_experiment_raises_the_cli_message(cli, tmp_path):
    with pytest.raises(tuning.UsageError, match="^unknown experiment 'nosuch'; valid: hotdog, hymenoptera") as raised:
        tuning.search("nosuch", storage=str(tmp_path / "runs"))
    with pytest.raises(tuning.UsageError, match="unknown option 'sampels'"):
        tuning.search("hymenoptera", sampels=3)
    with pytest.raises(tuning.UsageError, match="--name '../x' must be one folder name"):  # not a run beside storage
        tuning.search("hymenoptera", storage=str(tmp_path / "runs"), name="../x")
    assert not (tmp_path / "x").exists()
    out = cli("tuning.run", "nosuch", "--storage", str(tmp_path / "runs"))  # the command says the same line
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == f"tuning.run: error: {raised.value}"
    assert not (tmp_path / "runs").exists()
