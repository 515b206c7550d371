"""What a run dir records about itself, so that a report or a resume needs nothing but the dir."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from experiments.base import Experiment

SPEC_FILE = "run.json"


def save_spec(run_dir: Path, experiment: Experiment, classes: list[str]) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    spec = {"experiment": dataclasses.asdict(experiment), "classes": classes}
    tmp = run_dir / f".{SPEC_FILE}.tmp"
    tmp.write_text(json.dumps(spec, indent=2))
    tmp.replace(run_dir / SPEC_FILE)


def load_spec(run_dir: Path) -> tuple[Experiment, list[str]]:
    spec = json.loads((run_dir / SPEC_FILE).read_text())
    return Experiment(**spec["experiment"]), spec["classes"]
