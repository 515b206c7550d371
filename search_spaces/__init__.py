"""Optuna define-by-run search spaces, by name. Each is `space(trial, *, num_stages) -> dict`:
it only suggests values (keys are `tuning.hparams.HParams` fields) and does no work."""
from __future__ import annotations

from typing import Any, Callable

import optuna

from tuning.registry import Registry

SearchSpace = Callable[..., dict[str, Any]]
SEARCH_SPACES: Registry[SearchSpace] = Registry("search space")


@SEARCH_SPACES.register("finetune")
def finetune(trial: optuna.Trial, *, num_stages: int) -> dict[str, Any]:
    """The four knobs the seeds turn by hand. lr spans the seeds' 5e-5 (hotdog) to 1e-2; the head
    multiplier spans 1x (plain fine-tuning) to seed 004's 10x and beyond."""
    trial.suggest_float("lr", 1e-5, 3e-2, log=True)
    trial.suggest_float("head_lr_mult", 1.0, 100.0, log=True)
    trial.suggest_int("freeze_depth", 0, num_stages)
    trial.suggest_categorical("batch_size", [8, 16, 32, 64])
    return {}
