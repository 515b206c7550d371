"""Experiment registry: every `Experiment` defined in a module of this package, by name."""
from __future__ import annotations

import importlib
import pkgutil

from experiments.base import Experiment
from tuning.registry import Registry

EXPERIMENTS: Registry[Experiment] = Registry("experiment")

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        for _value in vars(importlib.import_module(f"{__name__}.{_mod.name}")).values():
            if isinstance(_value, Experiment):
                EXPERIMENTS.add(_value.name, _value)

__all__ = ["EXPERIMENTS", "Experiment"]
