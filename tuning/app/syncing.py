"""A workaround for a race in Ray 2.60's driver-side syncing, which printed a foreign traceback.

Ray saves the experiment state by writing `.{uuid}-tmp-search_gen_state-*.json` (and the like)
into the driver's staging folder and renaming it, while its background syncer copies that same
folder to the run dir. A copy that lists the temporary file and opens it after the rename fails
with `FileNotFoundError`, which Ray logs with its traceback ("Saving experiment state to storage
... failed"). It happens when syncs are slow, as on a machine running two searches at once, and
without any of our code (reproduced with Ray's own `_atomic_save` and `_upload_to_fs_path`: 5 of
200 copies failed). Nothing is lost (the renamed file is copied by the next sync), so the copy is
retried at once instead: the file it missed is there under its final name."""
from __future__ import annotations

import functools
import os
from typing import Any, Callable


def tolerate_vanishing_files(attempts: int = 5) -> None:
    """Wrap Ray's upload function, in this (the driver's) process, once."""
    from ray.train._internal import storage

    upload = storage._upload_to_fs_path
    if getattr(upload, "retries_vanished_files", False):
        return
    storage._upload_to_fs_path = retrying(upload, attempts)


def retrying(upload: Callable[..., None], attempts: int) -> Callable[..., None]:
    @functools.wraps(upload)
    def upload_again_if_a_file_vanished(local_path: str, *args: Any, **kwargs: Any) -> None:
        for attempt in range(attempts):
            try:
                return upload(local_path, *args, **kwargs)
            except FileNotFoundError:
                if attempt == attempts - 1 or not os.path.exists(local_path):
                    raise  # the folder itself is gone, or files keep vanishing: a real error

    upload_again_if_a_file_vanished.retries_vanished_files = True  # type: ignore[attr-defined]
    return upload_again_if_a_file_vanished
