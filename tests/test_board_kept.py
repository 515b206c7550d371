"""TensorBoard keeps every trial that reported, however the search ended: a time budget, Ctrl-C
and SIGTERM stop running trials without Ray's `log_trial_end`, the only place a writer used to be closed."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from tensorboard.plugins.hparams import plugin_data_pb2

from tests.conftest import make_image_folder, trial_dirs
from tests.test_faults import trial_field
from tuning.lib import metrics as M


def reported(run_dir: Path) -> list[Path]:
    """The trial dirs whose progress.csv holds at least one validation result."""
    dirs = []
    for d in trial_dirs(run_dir):
        try:
            if pd.read_csv(d / "progress.csv")[M.VAL_ACC].notna().any():
                dirs.append(d)
        except (OSError, KeyError, pd.errors.EmptyDataError, pd.errors.ParserError):
            pass  # not there yet, or being copied
    return dirs


def running_and_reported(run_dir: Path) -> set[Path]:
    """Trials that Ray's saved state shows running and that have reported: Ctrl-C now stops them."""
    state = trial_field(run_dir, "status")
    return {d for d in reported(run_dir) if state.get(d.name.removeprefix("trial_")) == "RUNNING"}


def assert_board_holds(trial_dir: Path) -> None:
    """TensorBoard's own reader finds the trial's last val/acc and its HParams session."""
    acc = EventAccumulator(str(trial_dir)).Reload()
    assert "val/acc" in acc.Tags()["scalars"], (trial_dir.name, [p.stat().st_size for p in trial_dir.glob("events.out.tfevents.*")])
    history = pd.read_csv(trial_dir / "progress.csv")
    assert acc.Scalars("val/acc")[-1].value == pytest.approx(history[M.VAL_ACC].dropna().iloc[-1])
    hparams = acc.PluginTagToContent("hparams")
    experiment = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/experiment"]).experiment
    assert [m.name.tag for m in experiment.metric_infos] == ["val/acc", "val/loss", "train/loss"]
    start = plugin_data_pb2.HParamsPluginData.FromString(hparams["_hparams_/session_start_info"]).session_start_info
    assert start.group_name == trial_dir.name.removeprefix("trial_")
    assert set(start.hparams) == set(json.loads((trial_dir / "params.json").read_text()))


def test_a_time_budget_keeps_the_curves_of_trials_it_stopped(cli, tiny_root, tiny_experiment, tmp_path):
    # 40 epochs never finish in the budget: the best trials are running when it stops them
    out = cli("tuning.run", "tiny", "--data-root", str(tiny_root), "--storage", str(tmp_path),
              "--samples", "50", "--epochs", "40", "--seed", "2", "--time-budget", "60s")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "time budget" in out.stdout, out.stdout[-2000:]
    run_dir = tmp_path / "tiny"
    dirs = reported(run_dir)
    assert dirs, out.stdout[-3000:]
    # the budget ended the search with trials running (a cheap head-only one may finish its 40 epochs)
    assert min(len(pd.read_csv(d / "progress.csv")) for d in dirs) < 40
    for d in dirs:
        assert_board_holds(d)


@pytest.mark.parametrize("sig, said", [(signal.SIGINT, "Ctrl-C"), (signal.SIGTERM, "SIGTERM")])
def test_ctrl_c_or_sigterm_keeps_the_curves_of_running_trials(tmp_path, sig, said):
    """SIGTERM (docker stop, Kubernetes) as Ctrl-C: the trials stop, the best so far is exported,
    the summary says why; it was Ray's stack dump and exit 134."""
    root = make_image_folder(tmp_path / "data" / "hymenoptera_data", {"train": 8, "val": 6}).parent
    log = tmp_path / "console.txt"
    with log.open("w") as console:
        driver = subprocess.Popen(
            [sys.executable, "-m", "tuning.run", "hymenoptera", "--smoke-test", "--samples", "20", "--epochs", "40",
             "--data-root", str(root), "--storage", str(tmp_path / "runs")],
            stdout=console, stderr=subprocess.STDOUT)
    run_dir = tmp_path / "runs" / "hymenoptera"
    deadline = time.time() + 300
    while not (running := running_and_reported(run_dir)):  # Ray copies to the run dir as it goes
        if driver.poll() is not None or time.time() > deadline:
            driver.kill()
            driver.wait()
            pytest.fail(f"no running trial reported before the search ended: {log.read_text()[-3000:]}")
        time.sleep(0.5)
    driver.send_signal(sig)
    driver.wait(timeout=300)
    console = log.read_text()
    assert driver.returncode == 0, console[-3000:]
    assert f"ended by {said}: " in console and "--resume continues the search" in console, console[-3000:]
    assert (run_dir / "best" / "model.json").is_file() and "SIGTERM received" not in console
    dirs = reported(run_dir)
    assert running <= set(dirs), log.read_text()[-3000:]
    for d in dirs:
        assert_board_holds(d)
