"""Two searches at once on one machine: shared caches, no foreign traceback, both exported; and
the races in Ray's driver-side syncing that it made likely (tuning.app.syncing)."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pyarrow.fs
import pytest

from tests.test_faults import data_root  # noqa: F401  (the fixture)
from tuning.app.syncing import retrying


def test_two_searches_started_together_both_finish_cleanly(data_root, tmp_path):  # noqa: F811
    env = {**os.environ, "TUNING_CACHE_DIR": str(tmp_path / "cache")}  # one cache for both
    runs = {name: subprocess.Popen(
        [sys.executable, "-m", "tuning.run", "hymenoptera", "--smoke-test", "--samples", "1", "--epochs", "1", "--data-root", str(data_root),
         "--storage", str(tmp_path / "runs"), "--name", name],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env) for name in ("a", "b")}
    for name, proc in runs.items():
        out, _ = proc.communicate(timeout=900)
        assert proc.returncode == 0, out[-3000:]
        assert "Traceback" not in out, out[-3000:]
        assert f"exported: {tmp_path / 'runs' / name / 'best'}" in out
        assert (tmp_path / "runs" / name / "best" / "model.pt").is_file()
    assert len(list((tmp_path / "cache" / "store").glob("*.arrow"))) == 1  # decoded once, shared


def test_a_sync_that_meets_a_vanished_temporary_file_is_retried(tmp_path):
    """Ray's own race, without any of our code: its experiment checkpoint renames temporary files
    in the folder its syncer is copying. Wrapped, no copy fails and the final file arrives."""
    from ray.train._internal import storage
    from ray.tune.utils.util import _atomic_save

    staging, dest = tmp_path / "staging", tmp_path / "dest"
    staging.mkdir()
    stop = threading.Event()

    def save_state() -> None:
        _atomic_save(state={"x": list(range(20000))}, checkpoint_dir=str(staging),
                     file_name="search_gen_state-x.json", tmp_file_name="tmp-search_gen_state-x.json")

    def save_state_repeatedly() -> None:
        while not stop.is_set():
            save_state()

    # saved once first, as Ray does before it syncs: else the 100 copies may all end before the
    # saver thread writes anything, and the final check fails for no fault of the copy (seen once in CI)
    save_state()
    upload = retrying(storage._upload_to_fs_path, attempts=5)
    saver = threading.Thread(target=save_state_repeatedly)
    saver.start()
    try:
        for _ in range(100):
            upload(str(staging), pyarrow.fs.LocalFileSystem(), str(dest))
    finally:
        stop.set()
        saver.join()
    assert (dest / "search_gen_state-x.json").is_file()


def test_the_retry_is_exactly_one_more_copy_and_a_missing_folder_still_fails(tmp_path):
    calls = []

    def flaky(local_path, fs, fs_path, exclude=None):
        calls.append(local_path)
        if len(calls) == 1 or not Path(local_path).exists():
            raise FileNotFoundError(f"{local_path}/.tmp-vanished")

    retrying(flaky, attempts=5)(str(tmp_path), None, "dest")
    assert calls == [str(tmp_path)] * 2
    with pytest.raises(FileNotFoundError):
        retrying(flaky, attempts=5)(str(tmp_path / "gone"), None, "dest")
    assert len(calls) == 3  # not retried: the folder itself is missing


def test_a_checkpoint_ray_lets_go_is_deleted_only_once_a_later_trial_list_is_stored(tmp_path):
    """Ray deletes a trial's older checkpoint when it registers a newer one; the trial list that
    stops naming the older one reaches the run dir with a later copy. The deletion waits for that
    copy: a driver killed in between leaves a trial list whose checkpoints all exist."""
    import pyarrow.fs as pafs
    from ray.train import Checkpoint, CheckpointConfig
    from ray.train._internal import storage
    from ray.train._internal.checkpoint_manager import _CheckpointManager
    from ray.train._internal.session import _TrainingResult

    from tuning.app.syncing import defer_checkpoint_deletion, flush_deletions

    defer_checkpoint_deletion()
    staging, run_dir = tmp_path / "staging", tmp_path / "run"
    staging.mkdir()
    state = staging / "experiment_state-x.json"
    state.write_text("{}")  # saved before the deletion below: it may still name that checkpoint
    time.sleep(0.05)
    manager = _CheckpointManager(CheckpointConfig(num_to_keep=1, checkpoint_score_attribute="acc"))
    folders = []
    for i, acc in enumerate([1.0, 0.0, 0.5]):  # the second is neither the best nor, after the third, the latest
        folder = run_dir / f"checkpoint_00000{i}"
        folder.mkdir(parents=True)
        folders.append(folder)
        manager.register_checkpoint(_TrainingResult(Checkpoint.from_directory(str(folder)), {"acc": acc}))
    assert all(f.is_dir() for f in folders)  # Ray asked to delete the second; it waits

    upload = retrying(storage._upload_to_fs_path, attempts=5)
    upload(str(staging), pafs.LocalFileSystem(), str(tmp_path / "copy"))
    assert folders[1].is_dir()  # the copied trial list was saved before Ray let it go
    time.sleep(0.05)
    state.write_text("{}")  # Ray's next snapshot, which no longer names it
    upload(str(staging), pafs.LocalFileSystem(), str(tmp_path / "copy"))
    assert not folders[1].exists() and folders[0].is_dir() and folders[2].is_dir()
    flush_deletions()
    assert folders[0].is_dir() and folders[2].is_dir()
