"""`folder:PATH`: an experiment for the user's own folder, made on demand rather than registered."""
from __future__ import annotations

from pathlib import Path

from experiments.base import Experiment
from tuning.lib.data.sources import FOLDER_PREFIX


def folder_experiment(path: Path) -> Experiment:
    """Nothing is known about the images, so the defaults (the tutorial's 224 px, 8 epochs) as they
    are. The path is absolute (`parse_folder`), so a --resume from another directory finds the same folder."""
    return Experiment(name=f"folder-{path.name}", dataset=f"{FOLDER_PREFIX}{path}")
