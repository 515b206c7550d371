"""Searches back to back in one process (a notebook, a service) do not pile up memory."""
from __future__ import annotations

from pathlib import Path

import tuning
from tests.conftest import make_image_folder


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS in /proc/self/status")


def test_three_searches_in_one_process_hold_what_the_first_held(ray_session, tmp_path):
    root = make_image_folder(tmp_path / "set", {"train": 6, "val": 4})
    held = []
    for i in range(3):
        result = tuning.search(f"folder:{root}", samples=2, epochs=1, storage=str(tmp_path / "runs"),
                               name=f"run{i}", seed=i)
        assert result.trials == 2
        held.append(rss_bytes())
    assert held[2] <= held[0] * 1.10, [f"{b / 2**20:.0f} MiB" for b in held]
