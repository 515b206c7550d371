"""Test-only fault injection, installed by the tests rather than read by the product's trainable:

    python -m tests.faulty FAULT MARKER_DIR [tuning.run arguments...]

runs `tuning.run` with `trainables.finetune.finetune` wrapped. FAULT is KIND[,PARAM=VALUE]:
`nan` makes the head's weights NaN so every loss is NaN; `raise@E` raises at the start of epoch E
on a trial's first attempt only (a retry can succeed); `raise-always@E` on every attempt; `kill@E`
and `kill-always@E` the same with SIGKILL to the trial's own process, as the OOM killer does it;
`block-export` puts a plain file where the run dir's `.exports` folder goes. With
`,PARAM=VALUE` only trials whose hyperparameter PARAM has that value are hit. The first-attempt
marker is keyed by trial id in MARKER_DIR, not in get_trial_dir(): Ray 2.60 gives a retried
trial a different dir when it lands on a reused actor, so a marker there would be missed.

Run as `__main__`, the wrapper is pickled by value into Ray's workers."""
from __future__ import annotations

import math
import os
import signal
import sys
from pathlib import Path
from typing import Any, Callable

from ray import tune

import trainables.finetune as product
from tuning.lib.checkpoint import load_state


def start_epoch() -> int:
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as path:
        return int(load_state(path)["epoch"])


FAULTS = ("raise", "raise-always", "kill", "kill-always")


def faulty(spec: str, marker_dir: str) -> Callable[..., None]:
    kind, _, condition = spec.partition(",")
    kind, _, at = kind.partition("@")

    def trainable(config: dict[str, Any], **kwargs: Any) -> None:
        key, _, value = condition.partition("=")
        if condition and str(config.get(key)) != value:
            return product.finetune(config, **kwargs)
        marker = Path(marker_dir) / f"{tune.get_context().get_trial_id()}.raised"
        marker.parent.mkdir(parents=True, exist_ok=True)
        original, epoch = product.train_one_epoch, [start_epoch()]

        def train_one_epoch(model, *args, **kw):
            if kind == "nan":
                model.head.weight.data.fill_(math.nan)
            elif kind in FAULTS and epoch[0] == int(at) and (kind.endswith("-always") or not marker.exists()):
                marker.touch()
                if kind.startswith("kill"):
                    os.kill(os.getpid(), signal.SIGKILL)
                raise RuntimeError(f"injected fault in epoch {epoch[0]}")
            epoch[0] += 1
            return original(model, *args, **kw)

        if kind == "block-export":
            (Path(tune.get_context().get_storage().experiment_fs_path) / ".exports").touch()

        product.train_one_epoch = train_one_epoch
        try:
            product.finetune(config, **kwargs)
        finally:
            product.train_one_epoch = original

    return trainable


if __name__ == "__main__":
    from tuning.run import main

    fault, markers, *argv = sys.argv[1:]
    main(argv, trainable=faulty(fault, markers))
