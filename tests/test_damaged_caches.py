"""A damaged cache never reaches a trial: one warning per entry, rebuilt, the clean run's results."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

from tests.test_faults import data_root  # noqa: F401  (the fixture)


def search(root: Path, tmp_path: Path, name: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "TUNING_CACHE_DIR": str(tmp_path / "cache")}
    cmd = [sys.executable, "-m", "tuning.run", "hymenoptera", "--smoke-test", "--samples", "2", "--epochs", "1",
           "--data-root", str(root), "--storage", str(tmp_path / "runs"), "--name", name]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=900, env=env)


def outcome(run_dir: Path) -> tuple[list[dict], dict]:
    table = pd.read_parquet(run_dir / "results.parquet")
    keep = [c for c in table.columns if c.startswith("hp_")] + ["best_val_acc", "best_val_loss", "epochs_run", "status"]
    # the linear probe's row has no optimizer, lr, ...: NaN, which never equals itself
    rows = table[keep].sort_values(["hp_freeze_depth", "epochs_run", "best_val_loss"]).astype(object)
    rows = rows.where(rows.notna(), None).to_dict("records")
    return rows, json.loads((run_dir / "best" / "model.json").read_text())["metrics"]


def test_a_search_over_a_cut_store_and_an_overwritten_feature_entry_matches_a_clean_run(data_root, tmp_path):  # noqa: F811
    clean = search(data_root, tmp_path, "clean")
    assert clean.returncode == 0, clean.stderr[-3000:]
    [store] = (tmp_path / "cache" / "store").glob("*.arrow")
    # the deepest entry of the frozen trial's epoch (it also left the shallower ones it passed through)
    entry = max((tmp_path / "cache" / "features").glob("*/d*-train-e0.npy"), key=lambda p: int(p.name[1:].split("-")[0]))
    store.write_bytes(store.read_bytes()[: store.stat().st_size // 2])  # a copy cut short
    with entry.open("r+b") as f:  # same size, same header, huge floats: garbage a trial would diverge on
        f.seek(256)
        f.write(b"\x7f" * (entry.stat().st_size - 256))

    again = search(data_root, tmp_path, "again")
    assert again.returncode == 0, again.stderr[-3000:]
    warnings = [line for line in again.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 2, again.stderr[-3000:]
    assert warnings[0].startswith(f"warning: decoded store {store} is damaged (")
    assert warnings[1].startswith(f"warning: feature cache entry {entry} is damaged (checksum differs")
    assert "Traceback" not in again.stderr
    assert outcome(tmp_path / "runs" / "again") == outcome(tmp_path / "runs" / "clean")
