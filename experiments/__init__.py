"""Experiment registry: every `Experiment` defined in a module of this package, by name, and
`get_experiment`, which also makes one for `folder:PATH`."""
from __future__ import annotations

import importlib
import pkgutil

from experiments.base import Experiment
from experiments.folder import folder_experiment
from tuning.lib.data.sources import parse_folder
from tuning.lib.registry import Registry

EXPERIMENTS: Registry[Experiment] = Registry("experiment")

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name not in ("base", "folder"):
        for _value in vars(importlib.import_module(f"{__name__}.{_mod.name}")).values():
            if isinstance(_value, Experiment):
                EXPERIMENTS.add(_value.name, _value)


def get_experiment(spec: str) -> Experiment:
    """A registered experiment by name, or one made for `folder:PATH`."""
    folder = parse_folder(spec)
    return folder_experiment(folder) if folder is not None else EXPERIMENTS.get(spec)


__all__ = ["EXPERIMENTS", "Experiment", "get_experiment"]
