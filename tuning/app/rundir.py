"""What a run dir records about itself, so that a report or a resume needs nothing but the dir."""
from __future__ import annotations

import dataclasses
import json
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pyarrow.fs as pafs

from experiments.base import Experiment
from tuning.app.location import RunLocation
from tuning.app.resuming import known_trials
from tuning.lib.errors import UsageError, warn
from tuning.lib.files import write_atomic

SPEC_FILE = "run.json"


def save_spec(run_dir: Path, experiment: Experiment, classes: list[str]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {"experiment": dataclasses.asdict(experiment), "classes": classes}
    write_atomic(run_dir / SPEC_FILE, json.dumps(spec, indent=2))


def load_spec(run_dir: Path) -> tuple[Experiment, list[str]]:
    spec = json.loads((run_dir / SPEC_FILE).read_text())
    # JSON has no tuples; the frozen Experiment holds its sequences as tuples
    fields = {k: tuple(v) if isinstance(v, list) else v for k, v in spec["experiment"].items()}
    return Experiment(**fields), spec["classes"]


def check_storage(location: RunLocation) -> None:
    """Fail before any work if the run dir cannot be written; leaves nothing behind.

    Asking is not enough (`os.access` says yes to root in /proc, and knows nothing of read-only
    mounts): a file is created and removed in the nearest folder that exists."""
    if location.remote:
        location.check_writable()  # an unknown scheme, a wrong endpoint, a missing bucket, no rights
        return
    storage = location.local.parent
    probe = storage
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"--storage {storage} is not writable ({probe} is not a folder)")
    try:
        with tempfile.NamedTemporaryFile(dir=probe, prefix=".tuning-probe-"):
            pass
    except OSError as err:
        raise UsageError(f"--storage {storage} is not writable (cannot create a file in {probe}: {err.strerror or err})") from None


@contextmanager
def run_dir_writes(location: RunLocation, searched: bool) -> Iterator[None]:
    """Our own writes to the run dir (run.json, the export, results.parquet) as one line on
    failure: a full disk or a folder that refuses a file is the user's to fix. After the search
    (`searched`), the trials are in the run dir already and --resume picks them up."""
    try:
        yield
    except OSError as err:
        what = f"{err.filename}: {err.strerror}" if err.filename and err.strerror else str(err) or type(err).__name__
        then = "; the trials are kept: fix that, then continue with --resume" if searched else ""
        raise UsageError(f"cannot write to the run dir {location.uri} ({what}){then}") from None


def check_run_dir(location: RunLocation, resume: bool) -> None:
    if resume:
        location.pull(SPEC_FILE)
        if not (location.local / SPEC_FILE).is_file():
            raise UsageError(f"nothing to resume: {location.uri} holds no run started by tuning.run")
    elif location.exists():
        raise UsageError(f"run dir {location.uri} exists; pass --resume to continue it, or another --name")


def check_same_experiment(run_dir: Path, experiment: Experiment) -> None:
    """--resume continues the search as it was started; a changed setting would make it another."""
    saved, _ = load_spec(run_dir)
    for f in dataclasses.fields(Experiment):
        was, now = getattr(saved, f.name), getattr(experiment, f.name)
        if was != now:
            raise UsageError(f"--resume continues the run as started: {f.name} was {was!r}, now {now!r}")


def prune_unknown_trials(location: RunLocation) -> list[str]:
    """Before --resume: remove trial dirs that the saved search state does not know.

    A driver killed between a trial's start (or its first upload) and the next state snapshot
    leaves a dir that no restored trial owns; its unreported work is redone by the restored
    search, and the stray dir would otherwise show up as a phantom trial in TensorBoard and in
    the run dir. Trials the state knows, finished or not, are never touched."""
    fs, root = location.filesystem()
    entries = fs.get_file_info(pafs.FileSelector(root))
    states = sorted(e.path for e in entries if e.base_name.startswith("experiment_state-") and e.is_file)
    if not states:
        return []
    with fs.open_input_stream(states[-1]) as f:
        known = set(known_trials(f.read()))
    removed = []
    for e in entries:
        if e.type == pafs.FileType.Directory and e.base_name.startswith("trial_"):
            if e.base_name.removeprefix("trial_") not in known:
                fs.delete_dir(e.path)
                removed.append(e.base_name)
    if removed:
        warn(f"removed {len(removed)} trial dir(s) started after the last saved search state "
             f"(their unreported work is redone): {', '.join(sorted(removed))}")
    return removed
