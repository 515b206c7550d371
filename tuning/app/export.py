"""The best trial's best epoch, as a self-contained model directory that `tuning.predict` loads.

`<run dir>/best/` holds `model.pt` (a plain state dict: loads with weights_only=True),
`model.json` (everything needed to rebuild the network and preprocess an image), `model.onnx`
(tuning.app.onnx_export: for runtimes without PyTorch) and `model_plain.pt` (the state dict under
timm's/torchvision's own key names, tuning.lib.plain). It is written to a temporary directory and
renamed into place, so a crash never leaves half an export."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ray.tune import ResultGrid

from experiments.base import Experiment
from tuning.app.onnx_export import ONNX_FILE, onnx_meta, write_onnx
from tuning.lib import metrics as M
from tuning.lib.backbones import BACKBONES
from tuning.lib.checkpoint import Feed, evaluate, load_state
from tuning.lib.data.decode import Split
from tuning.lib.data.transforms import Normalize, eval_batch, resize_for
from tuning.lib.errors import UsageError
from tuning.lib.files import write_atomic
from tuning.lib.model import FineTuneNet, build_model
from tuning.lib.plain import plain_constructor, to_plain

MODEL_FILE = "model.pt"
META_FILE = "model.json"
PLAIN_FILE = "model_plain.pt"


@dataclass(frozen=True)
class Best:
    trial_id: str
    config: dict[str, Any]
    metrics: dict[str, Any]
    checkpoint_path: str


def find_best(results: ResultGrid, floor: Best | None = None) -> Best:
    """Rank every kept checkpoint by val_acc ourselves, rather than trust get_best_result's scope
    handling (field notes: last vs best epoch surprises). Within a trial, Ray keeps the latest of
    epochs tied on val_acc; across trials, a tie goes to the lower val_loss. `floor` (the linear
    probe) is a candidate too, so the export is never worse than it."""
    candidates = []
    if floor is not None:
        candidates.append((floor.metrics[M.VAL_ACC], -floor.metrics[M.VAL_LOSS], None, None, floor))
    for result in results:
        for checkpoint, metrics in result.best_checkpoints or []:
            value = metrics.get(M.OBJECTIVE)
            if value is not None and math.isfinite(value):
                candidates.append((value, -metrics[M.VAL_LOSS], result, checkpoint, metrics))
    if not candidates:
        raise UsageError("no trial produced a checkpoint; see the errors above")
    value, _, result, checkpoint, metrics = max(candidates, key=lambda c: (c[0], c[1]))
    if result is None:
        return metrics  # the floor itself
    return Best(
        trial_id=metrics.get("trial_id", result.path.rsplit("/", 1)[-1]),
        config=dict(result.config),
        metrics={k: metrics[k] for k in (M.VAL_ACC, M.VAL_LOSS, M.TRAIN_LOSS, M.EPOCH) if k in metrics},
        checkpoint_path=checkpoint.path,
    )


def export(best: Best, experiment: Experiment, classes: list[str], run_dir: Path) -> Path:
    backbone = BACKBONES.get(experiment.backbone)
    meta = {
        "backbone": experiment.backbone,
        "classes": classes,
        "image_size": experiment.image_size,
        "resize": resize_for(experiment.image_size),
        "image_mode": experiment.image_mode,  # "L": decode as one channel
        "gray_input": experiment.gray_input,  # how the network takes one channel (tuning.lib.model)
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "hparams": best.config,
        "metrics": best.metrics,
        "trial_id": best.trial_id,
        "experiment": experiment.name,
    }
    meta["onnx"] = onnx_meta(meta)
    meta["plain"] = plain_meta(meta)
    state = load_state(best.checkpoint_path)["model"]
    versions = run_dir / ".exports"
    versions.mkdir(parents=True, exist_ok=True)
    version = Path(tempfile.mkdtemp(prefix="best-", dir=versions))
    try:
        torch.save(state, version / MODEL_FILE)
        torch.save(to_plain(state, experiment.backbone), version / PLAIN_FILE)
        write_onnx(*rebuild(meta, state), meta, version / ONNX_FILE)
        (version / META_FILE).write_text(json.dumps(meta, indent=2))
        swap_link(run_dir / "best", version)
    except BaseException:
        shutil.rmtree(version, ignore_errors=True)  # the previous export stays as it was
        raise
    return run_dir / "best"


def swap_link(link: Path, version: Path) -> None:
    """`best` is a relative symlink to a complete version dir, replaced in one rename: a crash at
    any point leaves either the previous export or the new one, never half of one."""
    tmp_link = link.with_name(f".{link.name}.{os.getpid()}")
    tmp_link.unlink(missing_ok=True)
    tmp_link.symlink_to(version.relative_to(link.parent))
    previous = link.resolve() if link.is_symlink() else None
    try:
        tmp_link.replace(link)
    except BaseException:
        tmp_link.unlink(missing_ok=True)
        raise
    if previous is not None and previous != version.resolve():
        shutil.rmtree(previous, ignore_errors=True)


def add_metrics(export_dir: Path, extra: dict[str, float]) -> None:
    meta_path = export_dir / META_FILE
    meta = json.loads(meta_path.read_text())
    meta["metrics"].update(extra)
    write_atomic(meta_path, json.dumps(meta, indent=2))


def plain_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """How model_plain.pt loads without this package, for model.json."""
    repeat = meta["image_mode"] == "L" and meta["gray_input"] == "repeat"
    return {
        "file": PLAIN_FILE,
        "build": plain_constructor(meta),
        "load": f"net.load_state_dict(torch.load({PLAIN_FILE!r}, weights_only=True), strict=True)",
        "input": "float NCHW crops as for model.onnx, scaled to 0..1 and normalised with `mean` and `std`"
                 + (" (gray: their averages), the gray channel repeated 3 times" if repeat else ""),
    }


def rebuild(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> tuple[FineTuneNet, Normalize]:
    """The eval-mode network and its normalisation, from model.json's fields and a state dict."""
    mode = meta.get("image_mode", "RGB")
    model = build_model(meta["backbone"], len(meta["classes"]), weights=None, image_mode=mode,
                        gray_input=meta.get("gray_input", "sum"))
    model.load_state_dict(state)
    return model.eval(), Normalize.for_mode(tuple(meta["mean"]), tuple(meta["std"]), mode)


def load_exported(export_dir: Path) -> tuple[FineTuneNet, dict[str, Any], Normalize]:
    meta_path, model_path = export_dir / META_FILE, export_dir / MODEL_FILE
    if not meta_path.is_file() or not model_path.is_file():
        raise UsageError(f"{export_dir} is not an export: it lacks {META_FILE} or {MODEL_FILE}")
    meta = json.loads(meta_path.read_text())
    model, norm = rebuild(meta, torch.load(model_path, map_location="cpu", weights_only=True))
    return model, meta, norm


def score_on_test(export_dir: Path, test: Split) -> float:
    """Accuracy of the exported model on the test split, preprocessed as validation is, recorded
    in the export's metrics. Called once, after the search: test never informs a choice."""
    model, meta, norm = load_exported(export_dir)
    x = eval_batch(test.images, meta["image_size"])
    feed = Feed(torch.from_numpy(np.asarray(test.labels)), lambda idx: model.frozen_features(norm(x[list(idx)])), False)
    _, acc = evaluate(model, feed)
    add_metrics(export_dir, {M.TEST_ACC: acc})
    return acc
