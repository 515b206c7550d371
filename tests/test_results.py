"""What a person reads: results.parquet, the report and TensorBoard's HParams data."""
from __future__ import annotations

import json

import pandas as pd
import pyarrow.parquet as pq
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import trial_dirs
from tuning.app.results import RESULTS_FILE
from tuning.lib import metrics as M
from tuning.report import main as report_main

COLUMNS = {"trial_id", "hp_lr", "hp_head_lr_mult", "hp_freeze_depth", "hp_batch_size", "best_val_acc",
           "best_epoch", "best_val_loss", "last_val_acc", "epochs_run", "status", "wall_time_s", "node_id", "test_acc"}


def test_results_parquet_has_one_row_per_trial_matching_its_history(finished_run, tiny_experiment):
    table = pq.read_table(finished_run / RESULTS_FILE).to_pandas()
    assert COLUMNS <= set(table.columns)
    probe, table = table.iloc[0], table.iloc[1:]  # the linear probe first, then the trials
    assert probe.trial_id == "probe" and probe.epochs_run == 0 and probe.status == "completed"
    assert len(table) == tiny_experiment.samples == table["trial_id"].nunique()
    for _, row in table.iterrows():
        history = pd.read_csv(finished_run / f"trial_{row.trial_id}" / "progress.csv")
        assert row.best_val_acc == pytest.approx(history[M.VAL_ACC].max())
        assert row.best_epoch == history.loc[history[M.VAL_ACC] == history[M.VAL_ACC].max(), M.EPOCH].max()
        assert row.last_val_acc == pytest.approx(history[M.VAL_ACC].iloc[-1])
        assert row.epochs_run == history[M.EPOCH].max()
        want = "completed" if row.epochs_run == tiny_experiment.epochs else "stopped early"
        assert row.status == want
        assert row.wall_time_s > 0 and row.node_id
    assert table["status"].eq("stopped early").any()


def test_report_ranks_trials_and_writes_pngs(finished_run, capsys):
    report_main([str(finished_run)])
    out = capsys.readouterr().out
    for name in ("val_acc_per_epoch.png", "val_acc_vs_hparams.png", "hparam_importance.png"):
        png = finished_run / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
        assert f"wrote {png}" in out
    table = pq.read_table(finished_run / RESULTS_FILE).to_pandas()
    top = table.sort_values(["best_val_acc", "best_val_loss"], ascending=[False, True]).iloc[0]
    rows = [line.split() for line in out.splitlines()[1 : len(table) + 1]]
    assert top.trial_id in rows[0]  # ranked by val_acc, then val_loss
    # the final model's members are marked, whatever their rank (the probe alone, often)
    members = {m["trial_id"] for m in json.loads((finished_run / "final.json").read_text())["members"]}
    assert set(table.trial_id[table.exported]) == members
    assert {r[2] for r in rows if r[1:2] == ["exported"]} == members


def test_tensorboard_hparams_for_every_trial(finished_run):
    for d in trial_dirs(finished_run):
        acc = EventAccumulator(str(d)).Reload()
        content = acc.PluginTagToContent("hparams")
        assert "_hparams_/session_start_info" in content, d.name
        start = content["_hparams_/session_start_info"]
        for name in ("lr", "head_lr_mult", "freeze_depth", "batch_size"):
            assert name.encode() in start, (d.name, name)
