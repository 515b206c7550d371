"""Workarounds for two races in Ray 2.60's driver-side syncing.

1. A copy that meets a renamed temporary file, which printed a foreign traceback.

Ray saves the experiment state by writing `.{uuid}-tmp-search_gen_state-*.json` (and the like)
into the driver's staging folder and renaming it, while its background syncer copies that same
folder to the run dir. A copy that lists the temporary file and opens it after the rename fails
with `FileNotFoundError`, which Ray logs with its traceback ("Saving experiment state to storage
... failed"). It happens when syncs are slow, as on a machine running two searches at once, and
without any of our code (reproduced with Ray's own `_atomic_save` and `_upload_to_fs_path`: 5 of
200 copies failed). Nothing is lost (the renamed file is copied by the next sync), so the copy is
retried at once instead: the file it missed is there under its final name.

2. A checkpoint deleted before the trial list that stops naming it is stored. With num_to_keep,
Ray deletes a trial's older checkpoint from the run dir when it registers a newer one, while the
trial list that names the newer one reaches the run dir with the next background copy. A driver
killed in between left a trial list naming a deleted checkpoint: on --resume that trial failed
("Could not recover from checkpoint as it does not exist on storage anymore") and ended errored.
The deletion now waits until a trial list saved after it has been copied to the run dir."""
from __future__ import annotations

import functools
import glob
import os
import threading
import time
from typing import Any, Callable

from tuning.app.resuming import STATE_GLOB  # the trial list Ray saves in its staging folder

# (when Ray asked, its delete function, filesystem, path): deletions waiting for a stored trial list
_pending: list[tuple[float, Callable[..., None], Any, str]] = []
_lock = threading.Lock()


def tolerate_vanishing_files(attempts: int = 5) -> None:
    """Wrap Ray's upload function, in this (the driver's) process, once."""
    from ray.train._internal import storage

    upload = storage._upload_to_fs_path
    if getattr(upload, "retries_vanished_files", False):
        return
    storage._upload_to_fs_path = retrying(upload, attempts)


def defer_checkpoint_deletion() -> None:
    """Make Ray's checkpoint manager, in this (the driver's) process, queue its deletions; the
    wrapped upload (`retrying`) carries them out once they are safe, `flush_deletions` at the end."""
    from ray.train._internal import checkpoint_manager

    delete = checkpoint_manager._delete_fs_path
    if getattr(delete, "deferred", False):
        return

    def delete_later(fs: Any, fs_path: str) -> None:
        with _lock:
            _pending.append((time.time(), delete, fs, fs_path))

    delete_later.deferred = True  # type: ignore[attr-defined]
    checkpoint_manager._delete_fs_path = delete_later


def delete_covered(saved: float) -> None:
    """Carry out the deletions asked for before `saved`, when the trial list just stored was written."""
    with _lock:
        due = [p for p in _pending if p[0] <= saved]
        _pending[:] = [p for p in _pending if p[0] > saved]
    for _, delete, fs, fs_path in due:
        delete(fs, fs_path)


def flush_deletions() -> None:
    """After the search: its last trial list is stored, nothing waits any more."""
    delete_covered(float("inf"))


def state_saved_at(local_path: str) -> float | None:
    """When the trial list in this staging folder was written; None for another folder."""
    times = [os.path.getmtime(p) for p in glob.glob(os.path.join(local_path, STATE_GLOB))]
    return max(times) if times else None


def retrying(upload: Callable[..., None], attempts: int) -> Callable[..., None]:
    @functools.wraps(upload)
    def upload_again_if_a_file_vanished(local_path: str, *args: Any, **kwargs: Any) -> None:
        saved = state_saved_at(local_path) if os.path.isdir(local_path) else None  # before the copy reads it
        for attempt in range(attempts):
            try:
                upload(local_path, *args, **kwargs)
                if saved is not None:
                    delete_covered(saved)
                return
            except FileNotFoundError:
                if attempt == attempts - 1 or not os.path.exists(local_path):
                    raise  # the folder itself is gone, or files keep vanishing: a real error

    upload_again_if_a_file_vanished.retries_vanished_files = True  # type: ignore[attr-defined]
    return upload_again_if_a_file_vanished
