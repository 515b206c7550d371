"""Optuna define-by-run search spaces, by name. Each is `space(trial, *, num_stages) -> dict`:
it only suggests values (keys are `tuning.lib.hparams.HParams` fields) and does no work.
`space_for` binds an experiment's space to its backbone's stage count: the one place that does."""
from __future__ import annotations

import functools
from typing import Any, Callable

import optuna

from experiments.base import Experiment
from tuning.lib.backbones import BACKBONES
from tuning.lib.registry import Registry

SearchSpace = Callable[..., dict[str, Any]]
SEARCH_SPACES: Registry[SearchSpace] = Registry("search space")


def space_for(experiment: Experiment) -> Callable[[optuna.Trial], dict[str, Any]]:
    """The experiment's search space, with freeze depth ranging over its backbone's stages."""
    num_stages = BACKBONES.get(experiment.backbone).num_stages
    return functools.partial(SEARCH_SPACES.get(experiment.search_space), num_stages=num_stages)


@SEARCH_SPACES.register("finetune")
def finetune(trial: optuna.Trial, *, num_stages: int) -> dict[str, Any]:
    """The knobs the seeds turn by hand. The seeds disagree on the optimizer (SGD with momentum in
    003/004, Adam in 000/001), so it is searched. Adam's steps are scale-free, so its useful lr sits
    about 10x below SGD's: lr is conditional on the optimizer. It keeps one name, so every trial has
    an `lr` (Optuna 5 accepts a name whose range differs between trials; TPE then pools both
    optimizers' values, which on a toy problem found optima as well as separate names did).
    SGD's lr spans the seeds' 5e-5 (hotdog) to 1e-2; Adam's the seeds' 1e-3 and well below. The head
    multiplier spans 1x (plain fine-tuning) to seed 004's 10x and beyond. Weight decay spans d2l's
    1e-3 up to 1e-2 and down to 1e-6, which is none in effect (a few hundred steps at lr <= 3e-2
    shrink weights by < 0.01 %) and stands for the seeds that use none (a log range cannot hold 0)."""
    optimizer = trial.suggest_categorical("optimizer", ["sgd", "adam"])
    if optimizer == "sgd":
        trial.suggest_float("lr", 1e-5, 3e-2, log=True)
    else:
        trial.suggest_float("lr", 1e-6, 3e-3, log=True)
    trial.suggest_float("head_lr_mult", 1.0, 100.0, log=True)
    trial.suggest_int("freeze_depth", 0, num_stages)
    trial.suggest_categorical("batch_size", [8, 16, 32, 64])
    trial.suggest_float("weight_decay", 1e-6, 1e-2, log=True)
    return {}
