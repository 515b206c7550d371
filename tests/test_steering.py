"""Steering and watching a search: time budget, timm backbones, the quiet console, TensorBoard,
warm start. One real CLI run (a subprocess with its own Ray, so its whole console is captured)
with a timm backbone serves the console, TensorBoard and timm tests."""
from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import optuna
import pytest
import timm
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from tests.conftest import make_image_folder, trial_dirs
from tuning.app.budget import parse_duration
from tuning.app.console import LOG_FILE
from tuning.app.export import META_FILE
from tuning.app.search import make_searcher
from tuning.app.tensorboard import EXPORT_TAGS, SCALARS
from tuning.app.warmstart import seeded_storage, warm_storage
from tuning.lib.backbones import BACKBONES
from tuning.lib.errors import UsageError

FOREIGN = [
    "Token authentication is",  # Ray's notice
    "A new study created in memory",  # Optuna's
    "Configuration for experiment",  # Ray Tune's box
    "To visualize your results with TensorBoard",  # Ray Tune's hint, with a path that is not the run dir
]
TAGS = set(SCALARS)


@pytest.mark.parametrize("text, seconds", [("90s", 90), ("10m", 600), ("1h", 3600), ("1.5h", 5400), ("45", 45), (30, 30)])
def test_durations(text, seconds):
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["soon", "10d", "-5m", "0", "m", ""])
def test_bad_durations(text):
    with pytest.raises(UsageError, match="--time-budget"):
        parse_duration(text)


def test_registry_takes_timm_names_and_lists_valid_names_on_a_miss():
    assert BACKBONES.get("timm:resnet10t").num_stages == 5  # act1, layer1..4: timm's feature_info
    assert BACKBONES.get("timm:convnext_atto").num_stages == 4
    with pytest.raises(UsageError, match=r"unknown backbone 'vgg'; valid: efficientnet_lite0, resnet18, resnet34, "
                                         r"resnet50, timm:NAME"):
        BACKBONES.get("vgg")


def user_env() -> dict[str, str]:
    """This process's environment as a user's shell has it: once this test session's Ray has
    started, Ray sets RAY_AUTH_MODE here, and a child that inherits it says nothing of tokens."""
    return {k: v for k, v in os.environ.items() if k != "RAY_AUTH_MODE"}


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory) -> tuple[subprocess.CompletedProcess, Path]:
    """`tuning.run` as a user runs it, on a timm model with weights the test saved to a file."""
    tmp = tmp_path_factory.mktemp("timm_run")
    root = make_image_folder(tmp / "data" / "hymenoptera_data", {"train": 8, "val": 8}).parent
    torch.manual_seed(0)
    weights = tmp / "resnet10t.pth"
    torch.save(timm.create_model("resnet10t", pretrained=False).state_dict(), weights)
    out = subprocess.run(
        [sys.executable, "-m", "tuning.run", "hymenoptera", "--smoke-test", "--samples", "3",
         "--backbone", "timm:resnet10t", "--weights", str(weights), "--data-root", str(root),
         "--storage", str(tmp / "runs"), "--feature-cache-gb", "0"],
        capture_output=True, text=True, timeout=900, env=user_env(),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return out, tmp / "runs" / "hymenoptera"


def test_console_holds_only_our_lines(timm_run):
    out, run_dir = timm_run
    console = out.stdout + out.stderr
    for line in FOREIGN:
        assert line not in console, console
    assert console.startswith("data: train 16, val 16 images")
    assert "best val_acc:" in out.stdout and f"log of Ray and Optuna: {run_dir / LOG_FILE}" in out.stdout
    assert out.stderr.strip() == "", out.stderr


def test_log_file_keeps_what_ray_and_optuna_said(timm_run):
    _, run_dir = timm_run
    log = (run_dir / LOG_FILE).read_text()
    for line in FOREIGN[:3]:  # Ray Tune gives the TensorBoard hint only with its own TBX logger
        assert line in log, log[-3000:]


def test_timm_backbone_end_to_end(timm_run):
    _, run_dir = timm_run
    meta = json.loads((run_dir / "best" / META_FILE).read_text())
    assert meta["backbone"] == "timm:resnet10t"
    assert 0 <= meta["hparams"]["freeze_depth"] <= 5
    assert meta["mean"] == list(timm.create_model("resnet10t").pretrained_cfg["mean"])


def test_tensorboard_holds_exactly_our_scalars_per_trial(timm_run):
    _, run_dir = timm_run
    dirs = [d for d in trial_dirs(run_dir) if (d / "progress.csv").is_file()]  # trials that reported
    assert len(dirs) >= 2
    meta = json.loads((run_dir / "best" / META_FILE).read_text())
    for d in dirs:
        acc = EventAccumulator(str(d), size_guidance={"images": 0}).Reload()
        assert set(acc.Tags()["scalars"]) == TAGS, (d, acc.Tags()["scalars"])
        epochs = len(acc.Scalars("val/acc"))
        assert epochs >= 1 and all(len(acc.Scalars(t)) == epochs for t in TAGS)
        assert acc.Scalars("lr/head")[0].value > 0
        exported = d.name == f"trial_{meta['trial_id']}"
        assert set(acc.Tags()["images"]) <= set(EXPORT_TAGS) and (EXPORT_TAGS[0] in acc.Tags()["images"]) == exported


def test_hparams_have_the_search_space_domains(timm_run):
    from tensorboard.plugins.hparams import plugin_data_pb2

    _, run_dir = timm_run
    acc = EventAccumulator(str(trial_dirs(run_dir)[0])).Reload()
    content = acc.PluginTagToContent("hparams")["_hparams_/experiment"]
    experiment = plugin_data_pb2.HParamsPluginData.FromString(content).experiment
    infos = {h.name: h for h in experiment.hparam_infos}
    assert [v.string_value for v in infos["batch_size"].domain_discrete.values] == ["8", "16", "32", "64"]
    assert [v.string_value for v in infos["freeze_depth"].domain_discrete.values] == [str(d) for d in range(6)]
    assert [v.string_value for v in infos["optimizer"].domain_discrete.values] == ["sgd", "adam"]
    assert infos["lr"].domain_interval.min_value == pytest.approx(1e-6)
    assert [m.name.tag for m in experiment.metric_infos] == ["val/acc", "val/loss", "train/loss"]
    start = plugin_data_pb2.HParamsPluginData.FromString(
        acc.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
    assert start.hparams["batch_size"].string_value in ("8", "16", "32", "64")
    assert start.hparams["lr"].number_value > 0


def test_budgeted_search_ends_in_time_and_exports(ray_session, tiny_root, tiny_experiment, tmp_path):
    import tuning

    result = tuning.search("tiny", data_root=str(tiny_root), storage=str(tmp_path), samples=200, seed=1,
                           time_budget="40s")
    assert result.wall_s <= 40 + 20
    assert result.trials < 200 and result.ended_by.startswith("the time budget (40s)")
    assert (result.export_dir / META_FILE).is_file()


def tpe_points(storage, experiment) -> list[dict]:
    searcher = make_searcher(experiment, storage)
    return [searcher.suggest(f"t{i}") for i in range(2)]


def test_warm_start_changes_what_tpe_samples(tiny_experiment):
    rng = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=5))
    from search_spaces import space_for

    points = []
    for _ in range(12):  # past TPE's 10 random start-up trials
        trial = rng.ask()
        space_for(tiny_experiment)(trial)
        points.append((trial.params, 1.0 if trial.params["optimizer"] == "adam" else 0.5))
        rng.tell(trial, 0.0)
    cold = tpe_points(None, tiny_experiment)
    warm = tpe_points(seeded_storage(tiny_experiment, points), tiny_experiment)
    assert cold[0] == warm[0] == tiny_experiment.recipe  # the recipe still runs first
    assert cold[1] != warm[1]
    assert tpe_points(None, tiny_experiment) == cold  # the same seed samples the same without history


def test_warm_start_reads_a_finished_run(finished_run, tiny_experiment):
    storage, n = warm_storage(finished_run, tiny_experiment)
    assert n == len([d for d in trial_dirs(finished_run) if (d / "progress.csv").is_file()]) >= 2
    study = optuna.load_study(study_name="optuna", storage=storage)
    assert tiny_experiment.recipe in [t.params for t in study.trials]


def test_warm_start_refuses_another_search_space(finished_run, tiny_experiment, tmp_path):
    other = tmp_path / "other"
    other.mkdir()
    spec = json.loads((finished_run / "run.json").read_text())
    spec["experiment"]["backbone"] = "resnet18"
    (other / "run.json").write_text(json.dumps(spec))
    with pytest.raises(UsageError, match=r"backbone resnet18 \(5 stages\), this search efficientnet_lite0 \(9\)"):
        warm_storage(other, tiny_experiment)


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_lines_elsewhere():
    from tuning.app.progress import ProgressBar, StatusLine, progress

    plain = progress(8, 3, io.StringIO(), time_left=lambda: 65.0)
    assert type(plain) is StatusLine
    plain.print([], force=True)
    assert plain.out.getvalue().startswith("[00:00:00] trials 0/8 done") and "00:01:05 of the budget left" in plain.out.getvalue()
    bar = progress(8, 3, Terminal(), time_left=lambda: 65.0)
    assert isinstance(bar, ProgressBar)
    bar.best = (0.75, {"lr": 0.1}, 0.3)
    bar.print([], force=True)
    shown = bar.out.getvalue()
    assert "0/8 trials" in shown and "best val_acc 0.7500" in shown and "00:01:05 of the budget left" in shown
    assert "\r" in shown  # redrawn in place
