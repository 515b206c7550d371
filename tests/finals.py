"""Final models made by hand for export tests: checkpoints of given networks, as candidates."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from tuning.app.final_model import Candidate, Final
from tuning.lib.checkpoint import CHECKPOINT_FILE
from tuning.lib.model import FineTuneNet


def candidate(folder: Path, model: FineTuneNet, trial_id: str = "t1", val_acc: float = 0.5,
              temperature: float = 1.0, classes: int = 2) -> Candidate:
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "epoch": 1}, folder / CHECKPOINT_FILE)
    return Candidate(trial_id, {"lr": 0.1, "freeze_depth": model.freeze_depth}, {"val_acc": val_acc, "val_loss": 0.5, "epoch": 1},
                     str(folder), np.zeros((4, classes), dtype=np.float32), model.freeze_depth, temperature=temperature)


def single(c: Candidate) -> Final:
    return Final("select", "single", [(c, 1.0)], {"acc": c.metrics["val_acc"], "nll": 0.5, "ece": 0.0})


def ensemble(members: list[tuple[Candidate, float]]) -> Final:
    return Final("ensemble", "ensemble", members, {"acc": 0.5, "nll": 0.5, "ece": 0.0})
