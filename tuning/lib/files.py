"""Files the library and the application write: one cache root per machine, and writes that are
atomic (a temporary file in the same folder, then one rename), so a killed writer never leaves
something that looks complete; and seals on cache entries, so a damaged one is never used."""
from __future__ import annotations

import hashlib
import json
import mmap
import os
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import xxhash

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


SEAL_SUFFIX = ".sum"
HEADER_BYTES = 64


def seal_path(path: Path) -> Path:
    return path.with_name(path.name + SEAL_SUFFIX)


def fingerprint(path: Path) -> dict[str, object]:
    """Size, first bytes and an xxh3-128 of the whole file (hashed from a read-only mapping: no
    copy; a fraction of a second per GB, benchmarks/README.md, throughput)."""
    with path.open("rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return {"size": 0, "header": "", "xxh3_128": xxhash.xxh3_128().hexdigest()}
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as m:
            return {"size": size, "header": m[:HEADER_BYTES].hex(), "xxh3_128": xxhash.xxh3_128(m).hexdigest()}


def seal(path: Path) -> None:
    """Record what `path` holds, in a sidecar written atomically after the entry itself: an entry
    whose writer died before its seal is not trusted (`damage` says so), never half-used."""
    write_atomic(seal_path(path), json.dumps(fingerprint(path)))


def damage(path: Path, full: bool = True) -> str | None:
    """Why `path` is not what its seal recorded, or None when it is. `full=False` checks size and
    header only: for a reader that trusts a full check done earlier on this machine."""
    try:
        recorded = json.loads(seal_path(path).read_text())
        size = path.stat().st_size
    except FileNotFoundError as err:
        return "no checksum recorded" if err.filename == str(seal_path(path)) else "missing"
    except (OSError, ValueError):
        return "unreadable checksum"
    if size != recorded.get("size"):
        return f"{size} bytes, {recorded.get('size')} recorded"
    with path.open("rb") as f:
        if f.read(HEADER_BYTES).hex() != recorded.get("header"):
            return "header differs from the recorded one"
    if full and fingerprint(path)["xxh3_128"] != recorded.get("xxh3_128"):
        return "checksum differs from the recorded one"
    return None


def unseal(path: Path) -> None:
    """Remove an entry and its seal (the entry first: a seal without an entry proves nothing)."""
    path.unlink(missing_ok=True)
    seal_path(path).unlink(missing_ok=True)
