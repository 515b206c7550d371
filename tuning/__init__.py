"""Hyperparameter search for fine-tuning pretrained image classifiers (Ray Tune + Optuna).

    import tuning
    result = tuning.search("hymenoptera", samples=8)
    tuning.load(result.export_dir).predict(["ant.jpg"])

The names below are imported on first use, so `import tuning.lib...` stays light and the library
never loads the application."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

_API = {"search": "tuning.app.api", "SearchResult": "tuning.app.api", "SearchOptions": "tuning.app.api",
        "load": "tuning.app.loading", "Predictor": "tuning.app.predictor",
        "UsageError": "tuning.lib.errors", "Experiment": "experiments.base"}


def __getattr__(name: str) -> Any:
    if name in _API:
        import importlib

        return getattr(importlib.import_module(_API[name]), name)
    raise AttributeError(f"module 'tuning' has no attribute {name!r}")


__all__ = ["__version__", *_API]
