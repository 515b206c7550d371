"""`<run dir>/results.parquet`: one row per trial, read from the run dir alone, so it can be
built for a finished, a running or a resumed search."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from ray.tune import ExperimentAnalysis

from tuning.app import probing
from tuning.app.export import META_FILE
from tuning.app.location import RunLocation
from tuning.app.rundir import load_spec
from tuning.lib import metrics as M
from tuning.lib.files import atomic_path

RESULTS_FILE = "results.parquet"
COMPLETED, STOPPED, ERRORED, DIVERGED, RUNNING, PENDING = (
    "completed", "stopped early", "errored", "diverged", "running", "pending",
)


def epoch_number(value: Any) -> int | float:
    """Whole epochs as ints; a report at an ASHA rung inside an epoch (trainables.finetune) as its fraction, 1.333."""
    value = float(value)
    return int(value) if value.is_integer() else value


def trial_status(ray_status: str, history: pd.DataFrame, max_epochs: int) -> str:
    if ray_status == "ERROR":
        return ERRORED
    if ray_status in ("PENDING", "PAUSED") and history.empty:
        return PENDING
    if ray_status != "TERMINATED":
        return RUNNING
    if not history.empty and not math.isfinite(history[M.TRAIN_LOSS].iloc[-1]):
        return DIVERGED
    epochs = float(history[M.EPOCH].max()) if not history.empty else 0
    return COMPLETED if epochs >= max_epochs else STOPPED


def collect(location: RunLocation) -> pd.DataFrame:
    experiment, _ = load_spec(location.local)
    analysis = ExperimentAnalysis(location.uri)
    frames = analysis.trial_dataframes
    exported = _exported(location.local)
    members = exported_ids(exported)
    rows = []
    for trial in analysis.trials:
        history = frames.get(trial.trial_id, pd.DataFrame())
        if M.EPOCH not in history:
            history = pd.DataFrame(columns=[M.EPOCH, M.VAL_ACC, M.VAL_LOSS, M.TRAIN_LOSS, "time_total_s", M.NODE_ID])
        best = _best_epoch(history)
        row: dict[str, Any] = {"trial_id": trial.trial_id}
        row.update({f"hp_{k}": v for k, v in trial.config.items()})
        row.update(
            best_val_acc=float(best[M.VAL_ACC]) if best is not None else None,
            best_epoch=epoch_number(best[M.EPOCH]) if best is not None else None,
            best_val_loss=float(best[M.VAL_LOSS]) if best is not None else None,
            last_val_acc=float(history[M.VAL_ACC].iloc[-1]) if len(history) else None,
            epochs_run=epoch_number(history[M.EPOCH].max()) if len(history) else 0,
            status=trial_status(trial.status, history, experiment.epochs),
            wall_time_s=float(history["time_total_s"].iloc[-1]) if len(history) else 0.0,
            node_id=str(history[M.NODE_ID].iloc[-1]) if len(history) and M.NODE_ID in history else None,
            exported=trial.trial_id in members,
            test_acc=exported.get("metrics", {}).get(M.TEST_ACC) if trial.trial_id in members else None,
        )
        rows.append(row)
    probe = probe_row(location.local, exported)
    return pd.DataFrame([*([probe] if probe else []), *rows])


def probe_row(run_dir: Path, exported: dict[str, Any]) -> dict[str, Any] | None:
    """The linear probe, the search's first result (tuning.app.probing), as a row like a trial's."""
    record = probing.load_record(run_dir)
    if record is None:
        return None
    metrics, is_exported = record["metrics"], record["trial_id"] in exported_ids(exported)
    return {
        "trial_id": record["trial_id"], **{f"hp_{k}": v for k, v in record["config"].items()},
        "best_val_acc": metrics[M.VAL_ACC], "best_epoch": 0, "best_val_loss": metrics[M.VAL_LOSS],
        "last_val_acc": metrics[M.VAL_ACC], "epochs_run": 0, "status": COMPLETED, "wall_time_s": record["seconds"],
        "node_id": None, "exported": is_exported,
        "test_acc": exported.get("metrics", {}).get(M.TEST_ACC) if is_exported else None,
    }


def _best_epoch(history: pd.DataFrame) -> pd.Series | None:
    """The latest of the epochs tied on the best val_acc: the rule the export follows (and the
    checkpoint Ray keeps)."""
    if not history[M.VAL_ACC].notna().any():
        return None
    return history[history[M.VAL_ACC] == history[M.VAL_ACC].max()].iloc[-1]


def exported_ids(meta: dict[str, Any]) -> set[str]:
    """The trials the export is made of: its members (a soup's, an ensemble's), or its one trial."""
    members = (meta.get("final") or {}).get("members") or []
    return {m["trial_id"] for m in members} or ({meta["trial_id"]} if "trial_id" in meta else set())


def _exported(run_dir: Path) -> dict[str, Any]:
    meta = run_dir / "best" / META_FILE
    return json.loads(meta.read_text()) if meta.is_file() else {}


def write(location: RunLocation) -> str:
    table = pa.Table.from_pandas(collect(location), preserve_index=False)
    with atomic_path(location.local / RESULTS_FILE) as tmp:
        pq.write_table(table, tmp)
    location.push(RESULTS_FILE)
    return location.file_uri(RESULTS_FILE)
