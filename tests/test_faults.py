"""Nothing lost: trial faults, divergence, SIGKILL of the driver and --resume, reproducibility."""
from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import cloudpickle
import pandas as pd
import pyarrow.parquet as pq
import pytest

import tests.faulty
from experiments import EXPERIMENTS
from tests.conftest import Ran, make_image_folder, trial_dirs
from tuning.app.search import make_searcher
from tuning.lib import metrics as M
from tuning.lib.backbones import BACKBONES


@pytest.fixture(scope="module")
def data_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("faultdata")
    make_image_folder(root / "hymenoptera_data", {"train": 8, "val": 6})
    return root


def run(cli, data_root: Path, storage: Path, *args: str, fault: str = "") -> Ran:
    """`tuning.run` in this process (tests.conftest.cli), with `fault` through the test's
    fault-injecting trainable (tests/faulty.py), pickled by value so Ray's workers need not
    import tests/. A killed trial kills its Ray worker, never this process."""
    argv = ["hymenoptera", "--smoke-test", "--data-root", str(data_root), "--storage", str(storage), *args]
    if not fault:
        return cli("tuning.run", *argv)
    cloudpickle.register_pickle_by_value(tests.faulty)
    return cli("tuning.run", *argv, trainable=tests.faulty.faulty(fault, str(storage / "faults")))


def epochs(trial_dir: Path) -> list[int]:
    return pd.read_csv(trial_dir / "progress.csv")[M.EPOCH].tolist()


def statuses(run_dir: Path) -> dict[str, str]:
    """Each trial's status; the linear probe (fitted in the driver, never a trial) is left out."""
    table = pq.read_table(run_dir / "results.parquet").to_pandas()
    return {t: s for t, s in zip(table["trial_id"], table["status"]) if t != "probe"}


def test_a_raising_trial_is_retried_from_its_checkpoint(cli, data_root, tmp_path):
    out = run(cli, data_root, tmp_path, "--samples", "2", "--epochs", "2", fault="raise@1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "errored: 0" in out.stdout
    run_dir = tmp_path / "hymenoptera"
    failures = trial_field(run_dir, "num_failures")
    second_epoch = [d for d in trial_dirs(run_dir) if len(epochs(d)) == 2]
    assert second_epoch, "no trial reached epoch 2"
    for d in second_epoch:
        # it raised in epoch 2, was retried, resumed from its epoch-1 checkpoint: epoch 1 ran once
        errors = (d / "error.txt").read_text() if (d / "error.txt").exists() else "no error.txt"
        assert failures[d.name.removeprefix("trial_")] == 1, errors[-3000:]
        assert epochs(d) == [1, 2]


def test_a_trial_that_always_fails_is_listed_and_the_search_finishes(cli, data_root, tmp_path):
    out = run(cli, data_root, tmp_path, "--max-failures", "1", fault="raise-always@0,freeze_depth=0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "errored: 1" in out.stdout and "errored: trial" in out.stdout
    assert "exported:" in out.stdout
    assert sorted(statuses(tmp_path / "hymenoptera").values())[0] == "completed" or \
        "errored" in statuses(tmp_path / "hymenoptera").values()
    assert list(statuses(tmp_path / "hymenoptera").values()).count("errored") == 1


def test_a_nan_loss_ends_that_trial_as_a_poor_result(cli, data_root, tmp_path):
    out = run(cli, data_root, tmp_path, fault="nan,freeze_depth=0")
    assert out.returncode == 0, out.stderr[-3000:]
    assert "errored: 0" in out.stdout
    run_dir = tmp_path / "hymenoptera"
    diverged = [t for t, s in statuses(run_dir).items() if s == "diverged"]
    assert len(diverged) == 1
    history = pd.read_csv(run_dir / f"trial_{diverged[0]}" / "progress.csv")
    assert history[M.VAL_ACC].tolist() == [0.0] and history[M.TRAIN_LOSS].isna().all()


def trial_field(run_dir: Path, field: str) -> dict[str, object]:
    """A field of every trial as Ray's own experiment state records it ({} while unreadable)."""
    files = sorted(run_dir.glob("experiment_state-*.json"))
    if not files:
        return {}
    try:
        trials = [(json.loads(t[0]), json.loads(t[1])) for t in json.loads(files[-1].read_text())["trial_data"]]
    except (json.JSONDecodeError, KeyError, IndexError):
        return {}
    return {t["trial_id"]: t.get(field, runtime.get(field)) for t, runtime in trials}


def experiment_state(run_dir: Path) -> dict[str, str]:
    return trial_field(run_dir, "status")


def test_sigkill_then_resume_keeps_every_finished_trial(cli, data_root, tmp_path):
    samples = 3
    cmd = [sys.executable, "-m", "tuning.run", "hymenoptera", "--smoke-test", "--samples", str(samples),
           "--epochs", "2", "--data-root", str(data_root), "--storage", str(tmp_path)]
    driver = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    run_dir = tmp_path / "hymenoptera"
    deadline = time.time() + 300
    while time.time() < deadline:
        state = experiment_state(run_dir)
        if "TERMINATED" in state.values():
            break
        time.sleep(0.2)
    else:
        driver.kill()
        pytest.fail("no trial finished in time")
    driver.send_signal(signal.SIGKILL)
    driver.wait()
    finished = {t for t, s in experiment_state(run_dir).items() if s == "TERMINATED"}
    before = {t: epochs(run_dir / f"trial_{t}") for t in finished}
    assert len(finished) < samples, "the search ended before it was killed"
    time.sleep(2)

    refused = cli(*cmd[2:])  # in this process: the refusal comes before Ray is asked anything
    assert refused.returncode == 2 and "pass --resume" in refused.stderr

    resumed = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"trials: {samples}," in resumed.stdout
    dirs = trial_dirs(run_dir)
    assert len(dirs) == samples
    for d in dirs:
        e = epochs(d)
        assert e == list(range(1, len(e) + 1)), (d.name, e)  # no epoch ran twice
    for t, e in before.items():
        assert epochs(run_dir / f"trial_{t}") == e  # finished trials were not run again
    assert len(statuses(run_dir)) == samples

    # --resume with other settings is refused: the run dir holds the settings it ran with
    changed = [*cmd[2:], "--resume"]
    changed[changed.index("--samples") + 1] = str(samples + 1)
    out = cli(*changed)
    assert out.returncode == 2 and f"samples was {samples}, now {samples + 1}" in out.stderr, out.stderr


def test_same_seed_samples_the_same_hyperparameters():
    def sequence(seed: int) -> list[dict]:
        import dataclasses

        searcher = make_searcher(dataclasses.replace(EXPERIMENTS.get("hymenoptera"), seed=seed))
        configs = []
        for i in range(14):  # past TPE's 10 random start-up trials
            config = searcher.suggest(str(i))
            configs.append(config)
            searcher.on_trial_complete(str(i), {M.VAL_ACC: (config["lr"] * 1e3) % 1.0})
        return configs

    first, second = sequence(7), sequence(7)
    assert first == second
    assert first[0] == EXPERIMENTS.get("hymenoptera").recipe
    assert sequence(8)[1:] != first[1:]


def test_resume_prunes_only_trial_dirs_the_saved_state_does_not_know(tmp_path, capsys):
    from tuning.app.location import RunLocation
    from tuning.app.rundir import prune_unknown_trials

    run_dir = tmp_path / "run"
    for trial in ("aaaa0001", "aaaa0002", "bbbb0003"):
        (run_dir / f"trial_{trial}" / "checkpoint_000000").mkdir(parents=True)
    state = {"trial_data": [[json.dumps({"trial_id": t}), "{}"] for t in ("aaaa0001", "aaaa0002")]}
    (run_dir / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(state))
    assert prune_unknown_trials(RunLocation(str(tmp_path), "run")) == ["trial_bbbb0003"]
    assert sorted(p.name for p in trial_dirs(run_dir)) == ["trial_aaaa0001", "trial_aaaa0002"]
    assert "removed 1 trial dir(s)" in capsys.readouterr().err


@pytest.mark.parametrize("listed", [2, 4], ids=["searcher-newer", "searcher-older"])
def test_a_resumed_search_counts_the_trials_its_trial_list_holds(tmp_path, listed):
    """A driver killed between the uploads of the trial list and the searcher's snapshot: the
    resumed search creates trials up to --samples counting those the trial list holds, not the
    searcher's own count (3 here), which made `--samples 4` run 5 trials."""
    from ray.tune.experiment import Experiment as RayExperiment

    from tuning.app.resuming import search_algorithm

    def generator():
        made = search_algorithm(make_searcher(EXPERIMENTS.get("hymenoptera")), max_concurrent=4)
        made.add_configurations(RayExperiment("run", run=lambda config: None, num_samples=4))
        return made

    before = generator()
    created = [before.next_trial().trial_id for _ in range(3)]
    before.save_to_dir(str(tmp_path), "2026-01-01_00-00-00")
    ids = (created + ["dddd0004"])[:listed]
    state = {"trial_data": [[json.dumps({"trial_id": t}), "{}"] for t in ids]}
    (tmp_path / "experiment_state-2026-01-01_00-00-00.json").write_text(json.dumps(state))
    resumed = generator()
    resumed.restore_from_dir(str(tmp_path))
    more = 0
    while resumed.next_trial() is not None:
        more += 1
    assert listed + more == 4, (listed, more)


def test_a_worker_killed_by_the_os_is_retried_from_its_checkpoint(cli, data_root, tmp_path):
    """SIGKILL to the trial's own process in its second epoch (as the OOM killer does), once per
    trial: each is retried from its epoch-1 checkpoint and none is lost or run twice."""
    samples = 3
    out = run(cli, data_root, tmp_path, "--samples", str(samples), "--epochs", "2", fault="kill@1")
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"trials: {samples}, errored: 0" in out.stdout
    run_dir = tmp_path / "hymenoptera"
    failures = trial_field(run_dir, "num_failures")
    assert len(failures) == samples and len(trial_dirs(run_dir)) == samples
    killed = [d for d in trial_dirs(run_dir) if len(epochs(d)) == 2]  # ASHA may stop some after epoch 1
    assert killed, "no trial reached epoch 2"
    for d in killed:
        assert failures[d.name.removeprefix("trial_")] == 1, (d.name, failures)
        assert epochs(d) == [1, 2]  # epoch 1 ran once: the retry started from its checkpoint
    assert set(statuses(run_dir).values()) <= {"completed", "stopped early"}


def test_a_worker_killed_more_than_max_failures_times_is_errored_and_the_rest_go_on(cli, data_root, tmp_path):
    samples = 3
    deepest = BACKBONES.get(EXPERIMENTS.get("hymenoptera").backbone).num_stages
    out = run(cli, data_root, tmp_path, "--samples", str(samples), "--max-failures", "1",
              fault=f"kill-always@0,freeze_depth={deepest}")  # trial 1: the start-up goes deepest first
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"trials: {samples}, errored: 1" in out.stdout and "exported:" in out.stdout
    run_dir = tmp_path / "hymenoptera"
    status = statuses(run_dir)
    failures = trial_field(run_dir, "num_failures")
    assert len(status) == samples == len(failures)
    errored = [t for t, s in status.items() if s == "errored"]
    assert len(errored) == 1 and failures[errored[0]] == 2  # the first attempt and its one retry
    assert all(failures[t] == 0 for t in status if t not in errored)


def test_a_run_dir_write_that_fails_after_the_search_is_one_line_and_resume_finishes(cli, data_root, tmp_path):
    """A trial puts a plain file where `.exports` goes: the export cannot be written. One line,
    exit 2, the trials kept; with the obstacle gone, --resume exports without training again."""
    out = run(cli, data_root, tmp_path, "--samples", "2", "--epochs", "1", fault="block-export")
    assert out.returncode == 2, out.stderr[-3000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("tuning.run: error: cannot write to the run dir") and "--resume" in last, last
    print(last)  # for the record (pytest -s)
    assert "Traceback" not in out.stderr
    run_dir = tmp_path / "hymenoptera"
    kept = {d.name: epochs(d) for d in trial_dirs(run_dir)}
    assert len(kept) == 2 and not (run_dir / "best").exists()
    (run_dir / ".exports").unlink()
    # the same (wrapped) trainable, as --resume requires; no trial runs again to block the export
    resumed = run(cli, data_root, tmp_path, "--samples", "2", "--epochs", "1", "--resume", fault="block-export")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "trials: 2, errored: 0" in resumed.stdout and (run_dir / "best" / "model.pt").is_file()
    assert {d.name: epochs(d) for d in trial_dirs(run_dir)} == kept  # nothing trained again
    assert len(statuses(run_dir)) == 2
