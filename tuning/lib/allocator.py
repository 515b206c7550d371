"""jemalloc for the processes that run networks, and handing freed heap back to the OS.

glibc's malloc maps every block over 32 MiB (its mmap threshold cannot go higher) and unmaps it
when freed, so the kernel faults in and zeroes a step's large activations again at every step,
and the search spent a large share of its CPU time in the kernel. jemalloc, kept from purging on
its own, reuses those pages; `release_memory` purges when a trial ends, as malloc_trim does for
glibc (benchmarks/README.md, search: jemalloc against glibc).

jemalloc is Ray's own copy (`ray/core/libjemalloc.so`, which Ray preloads into its raylet), or
the library `RAY_JEMALLOC_LIB_PATH` names. It has to be preloaded when a process starts: trial
workers inherit it from the Ray started here (`preloaded_children`), the command re-executes
itself with it (`exec_with_jemalloc`). `TUNING_JEMALLOC=0` keeps glibc's malloc everywhere.
"""
from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib.util
import os
import sys
from typing import Callable, Iterator

JEMALLOC_ENV = "TUNING_JEMALLOC"  # "0": glibc's malloc everywhere
STARTED_ENV = "TUNING_STARTED"  # set by exec_with_jemalloc for the process it becomes
# never purge on a timer (its default purges blocks over 8 MiB at once: the faults come back);
# release_memory purges when a trial ends
MALLOC_CONF = "dirty_decay_ms:-1,muzzy_decay_ms:-1"
PURGE_ALL_ARENAS = b"arena.4096.purge"  # MALLCTL_ARENAS_ALL


def jemalloc_path() -> str | None:
    """The jemalloc to preload, or None: switched off, not Linux, or no library found."""
    if os.environ.get(JEMALLOC_ENV, "1") == "0" or not sys.platform.startswith("linux"):
        return None
    path = os.environ.get("RAY_JEMALLOC_LIB_PATH")
    if not path:
        spec = importlib.util.find_spec("ray")  # finds Ray's folder without importing it (seconds)
        if spec is None or not spec.submodule_search_locations:
            return None
        path = os.path.join(list(spec.submodule_search_locations)[0], "core", "libjemalloc.so")
    return path if os.path.isfile(path) else None


def preload_env() -> dict[str, str]:
    """Environment variables that give a new process jemalloc ({} where there is none, or where
    the user preloads a library of their own)."""
    path = jemalloc_path()
    if path is None or os.environ.get("LD_PRELOAD", path) != path:
        return {}
    return {"LD_PRELOAD": path, "MALLOC_CONF": MALLOC_CONF}


@contextlib.contextmanager
def preloaded_children() -> Iterator[None]:
    """Processes started inside (a local Ray's raylet, and through it every worker) inherit the
    preload. Ray keeps a preload from its workers unless `RAY_LD_PRELOAD_ON_WORKERS` is 1. Not
    through a runtime_env: a worker with an env of its own took 1.5-2.7 s to start against
    0.2-0.9 s, as Ray's idle workers no longer fit it."""
    env = preload_env()
    if env:
        env["RAY_LD_PRELOAD_ON_WORKERS"] = "1"
    saved = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def exec_with_jemalloc(started: float) -> float:
    """Become this same command with jemalloc preloaded, once; returns when the user's clock
    started (`started` of the first process). The process keeps its id; nothing has run yet."""
    if STARTED_ENV in os.environ:  # the second start: children get the preload only by preloaded_children
        first = float(os.environ.pop(STARTED_ENV))
        for name, value in preload_env().items():
            if os.environ.get(name) == value:
                del os.environ[name]
        return first
    env = preload_env()
    if not env or using_jemalloc():
        return started
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], {**os.environ, **env, STARTED_ENV: repr(started)})
    return started  # not reached


def _symbol(name: str) -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL(None), name, None)  # the process's own malloc, preloaded or glibc's
    except OSError:
        return None


MALLCTL = _symbol("mallctl")
MALLOC_TRIM = _symbol("malloc_trim")  # glibc only


def using_jemalloc() -> bool:
    return MALLCTL is not None


def release_memory() -> None:
    """Hand the heap that a trial freed back to the OS. Ray reuses a trial's worker for the next
    trial, and a freed heap kept would add up to twice a step's peak (glibc keeps it in per-thread
    arenas, jemalloc as configured above). Not at each epoch's end: every epoch then faulted its
    pages in again, for no lower peak (benchmarks/README.md, search)."""
    gc.collect()
    if MALLCTL is not None:
        MALLCTL(PURGE_ALL_ARENAS, None, None, None, ctypes.c_size_t(0))
    elif MALLOC_TRIM is not None:
        MALLOC_TRIM(0)
