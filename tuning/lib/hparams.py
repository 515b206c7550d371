"""The searched hyperparameters as the trainable reads them from a Ray Tune `config`."""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any


@dataclass(frozen=True)
class HParams:
    lr: float  # the backbone's learning rate
    head_lr_mult: float  # the head trains at lr * head_lr_mult
    freeze_depth: int  # stages frozen from the input side; num_stages = only the head trains
    batch_size: int
    optimizer: str = "sgd"  # "sgd" (momentum, seeds 003/004) or "adam" (seeds 000/001)
    momentum: float = 0.9  # SGD's, as the seeds' hymenoptera and hotdog recipes
    weight_decay: float = 0.0  # L2 on every trained parameter, for either optimizer

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "HParams":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in config.items() if k in names})

    def as_config(self) -> dict[str, Any]:
        return asdict(self)
