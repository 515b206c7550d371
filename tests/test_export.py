"""The export is swapped in whole: a crash while exporting leaves the previous one intact."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from experiments import EXPERIMENTS
from tuning.app import export as export_mod
from tests.finals import candidate, single
from tuning.app.export import export, load_exported
from tuning.app.final_model import Final
from tuning.lib.model import build_model


def fake_best(tmp_path: Path, value: float) -> Final:
    return single(candidate(tmp_path / f"ckpt-{value}", build_model("efficientnet_lite0", 2, None), val_acc=value))


def test_re_export_replaces_and_a_crash_keeps_the_previous(tmp_path, monkeypatch):
    experiment = EXPERIMENTS.get("hymenoptera")
    run_dir = tmp_path / "run"
    export(fake_best(tmp_path, 0.5), experiment, ["a", "b"], run_dir)
    export(fake_best(tmp_path, 0.6), experiment, ["a", "b"], run_dir)
    assert json.loads((run_dir / "best" / "model.json").read_text())["metrics"]["val_acc"] == 0.6
    assert len(list((run_dir / ".exports").iterdir())) == 1  # the replaced version is gone

    def crash(self, target):
        raise OSError("disk full")

    monkeypatch.setattr(Path, "replace", crash)
    with pytest.raises(OSError):
        export(fake_best(tmp_path, 0.7), experiment, ["a", "b"], run_dir)
    monkeypatch.undo()
    assert len(list((run_dir / ".exports").iterdir())) == 1  # the half-written version is cleaned up
    assert sorted(p.name for p in run_dir.iterdir()) == [".exports", "best"]
    model, meta, _ = load_exported(run_dir / "best")
    assert meta["metrics"]["val_acc"] == 0.6
    state = torch.load(run_dir / "best" / export_mod.MODEL_FILE, weights_only=True)
    assert set(state) == set(model.members[0].state_dict())
