"""Files the library and the application write: one cache root per machine, and writes that are
atomic (a temporary file in the same folder, then one rename), so a killed writer never leaves
something that looks complete."""
from __future__ import annotations

import hashlib
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

CACHE_ENV = "TUNING_CACHE_DIR"


def cache_root() -> Path:
    """`$TUNING_CACHE_DIR`, else `$XDG_CACHE_HOME/tuning`, else `~/.cache/tuning`: the decoded
    store, the feature cache and the local mirror of remote run dirs all live under it."""
    given = os.environ.get(CACHE_ENV)
    if given:
        return Path(given).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "tuning"


@contextmanager
def atomic_path(path: Path) -> Iterator[Path]:
    """Yields a temporary path beside `path`; renamed onto `path` if the block succeeds, removed if not."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        tmp.replace(path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_atomic(path: Path, payload: bytes | memoryview | str) -> None:
    with atomic_path(path) as tmp:
        if isinstance(payload, str):
            tmp.write_text(payload)
        else:
            with tmp.open("wb") as f:
                f.write(payload)


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
