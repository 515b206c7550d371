"""jemalloc in the processes that run networks (tuning.lib.allocator): the command re-executes
itself with it and `release_memory` purges what it keeps (that Ray's workers start with it:
tests/test_cli.py, in a search's fresh process). Each check runs in a fresh interpreter: a preload
only takes effect when a process starts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tuning.lib.allocator import JEMALLOC_ENV, jemalloc_path, preload_env

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.skipif(jemalloc_path() is None, reason="no jemalloc: not Linux, or Ray ships none")


def python(code: str, **env: str) -> dict:
    """Run `code` in a fresh interpreter (`python -c`); it prints one JSON line last."""
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT), **env}, timeout=300)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


REEXEC = textwrap.dedent("""
    import json, os
    from tuning.lib import allocator
    started = allocator.exec_with_jemalloc(123.5)
    print(json.dumps({"jemalloc": allocator.using_jemalloc(), "started": started,
                      "left": {k: os.environ.get(k) for k in ("LD_PRELOAD", "MALLOC_CONF", "TUNING_STARTED")}}))
""")
NONE_LEFT = {"LD_PRELOAD": None, "MALLOC_CONF": None, "TUNING_STARTED": None}


def test_the_command_reexecutes_itself_once_with_jemalloc_and_keeps_the_users_clock():
    got = python(REEXEC)
    # the variables are gone: a child gets the preload only through preloaded_children (Ray's start)
    assert got == {"jemalloc": True, "started": 123.5, "left": NONE_LEFT}


def test_jemalloc_can_be_switched_off():
    assert python(REEXEC, **{JEMALLOC_ENV: "0"}) == {"jemalloc": False, "started": 123.5, "left": NONE_LEFT}


def test_a_preload_of_the_users_own_is_kept():
    # a library of the user's (here glibc's own libc, harmless to preload; ld.so finds it by name)
    # stays, and no jemalloc comes
    got = python(REEXEC, LD_PRELOAD="libc.so.6")
    assert got == {"jemalloc": False, "started": 123.5, "left": {**NONE_LEFT, "LD_PRELOAD": "libc.so.6"}}


def test_release_memory_purges_what_jemalloc_keeps():
    got = python("""
        import json, torch
        from tuning.lib.allocator import release_memory
        def rss_gb(): return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**30
        base = rss_gb()
        blocks = [torch.ones(64 * 2**20 // 4) for _ in range(16)]  # 1 GiB in 64 MiB blocks, written
        del blocks
        kept = rss_gb() - base
        release_memory()
        print(json.dumps({"kept": kept, "after": rss_gb() - base}))
    """, **preload_env())
    assert got["kept"] > 0.9, got  # freed, but kept for the next step (no page faults to refill it)
    assert got["after"] < 0.2, got  # handed back when a trial or epoch ends
