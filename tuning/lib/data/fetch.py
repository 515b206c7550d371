"""Where datasets live on disk, and fetching an archive when a dataset is absent."""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from pathlib import Path

from tuning.lib.errors import UsageError

DATA_ROOT_ENV = "TUNING_DATA_ROOT"


def resolve_data_root(arg: str | None) -> Path:
    return Path(arg or os.environ.get(DATA_ROOT_ENV) or "data").expanduser()


def locate(root: Path, dirname: str, url: str | None = None, sha1: str | None = None) -> Path:
    """`root/dirname`, downloaded and extracted there first when absent and there is a `url`."""
    base = root / dirname
    if base.is_dir():
        return base
    if url is None:
        raise UsageError(f"dataset folder {base} not found; put the data there or pass --data-root")
    try:
        download_zip(url, root, sha1)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise UsageError(
            f"{base} not found and downloading {url} failed ({err}); "
            f"put the '{dirname}' folder under {root} (or pass --data-root / set {DATA_ROOT_ENV})"
        ) from None
    if not base.is_dir():
        raise UsageError(f"the archive from {url} holds no '{dirname}' folder")
    return base


def download_zip(url: str, root: Path, sha1: str | None, timeout: float = 30.0) -> None:
    """Download to a temporary file, check it, then extract: a failed fetch leaves nothing behind."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        archive = Path(tmp) / "archive.zip"
        print(f"downloading {url} ...", file=sys.stderr)
        with urllib.request.urlopen(url, timeout=timeout) as response, archive.open("wb") as out:
            shutil.copyfileobj(response, out)
        if sha1 is not None:
            digest = hashlib.sha1(archive.read_bytes()).hexdigest()
            if digest != sha1:
                raise ValueError(f"sha1 {digest} does not match the expected {sha1}")
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(root)
