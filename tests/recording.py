"""Test-only: a trainable that records the head it was handed (`head_init`) in a folder, then
fine-tunes as usual."""
from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any, Callable

from ray import tune

import trainables.finetune as product


def recording(folder: str) -> Callable[..., None]:
    def trainable(config: dict[str, Any], **kwargs: Any) -> None:
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / f"{tune.get_context().get_trial_id()}.pkl").write_bytes(pickle.dumps(kwargs["head_init"]))
        return product.finetune(config, **kwargs)

    return trainable
