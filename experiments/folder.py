"""`folder:PATH`: an experiment for the user's own folder, made on demand rather than registered."""
from __future__ import annotations

from pathlib import Path

from experiments.base import Experiment
from tuning.datasets import FOLDER_PREFIX


def folder_experiment(spec: str) -> Experiment:
    """Nothing is known about the images, so the defaults (the tutorial's 224 px, 8 epochs) as they
    are. The path is made absolute, so a --resume from another directory finds the same folder."""
    given = spec[len(FOLDER_PREFIX):]
    if not given:
        return Experiment(name="folder", dataset=FOLDER_PREFIX)  # create_source says what is missing
    path = Path(given).expanduser().resolve()
    return Experiment(name=f"folder-{path.name}", dataset=f"{FOLDER_PREFIX}{path}")
