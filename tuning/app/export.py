"""The final model (tuning.app.final_model: one trial's best epoch, a soup or an ensemble), as a
self-contained model directory that `tuning.predict` and `tuning.load` read.

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
from typing import Any, Sequence

import numpy as np
import torch
from ray.tune import ResultGrid

from experiments.base import Experiment
from tuning.app.final_model import Final
from tuning.app.onnx_export import ONNX_FILE, onnx_meta, write_onnx
from tuning.lib import metrics as M
from tuning.lib.backbones import BACKBONES
from tuning.lib import calibration as C
from tuning.lib.checkpoint import load_state
from tuning.lib.data.decode import Split
from tuning.lib.data.transforms import Normalize, eval_batch, resize_for
from tuning.lib.ensemble import Ensemble
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
    probe) is a candidate too. The export is chosen by tuning.app.final_model; this is the best
    single report, which the summary and results name."""
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


def final_meta(final: Final) -> dict[str, Any]:
    """model.json's `final`: what the export is (one trial, a soup or an ensemble) and its members."""
    temperatures = [final.soup_temperature] if final.soup_state is not None else [c.temperature for c, _ in final.members]
    return {
        "kind": final.kind, "method": final.method,
        "members": [{"trial_id": c.trial_id, "epoch": c.metrics.get(M.EPOCH, 0), "weight": w, "freeze_depth": c.freeze_depth,
                     "temperature": c.temperature, "hparams": c.config, "val_acc": c.metrics.get(M.VAL_ACC),
                     "val_loss": c.metrics.get(M.VAL_LOSS)} for c, w in final.members],
        "temperature": temperatures[0] if final.kind != "ensemble" else None,
        "mirror": final.mirror,  # each member's logits averaged over the image and its left-right mirror
        "val": final.val,
    }


def final_state(final: Final, meta: dict[str, Any]) -> dict[str, torch.Tensor]:
    """model.pt: one network's state dict (a trial's, or a soup's), or the ensemble's."""
    if final.soup_state is not None:
        return final.soup_state
    if final.kind != "ensemble":
        return load_state(final.members[0][0].checkpoint_path)["model"]
    nets = [member_net(meta, m["freeze_depth"], load_state(c.checkpoint_path)["model"])
            for m, (c, _) in zip(meta["final"]["members"], final.members)]
    return Ensemble(nets, [w for _, w in final.members], [c.temperature for c, _ in final.members]).state_dict()


def export(final: Final, experiment: Experiment, classes: list[str], run_dir: Path) -> Path:
    backbone = BACKBONES.get(experiment.backbone)
    lead = final.lead
    meta = {
        "backbone": experiment.backbone,
        "classes": classes,
        "image_size": experiment.image_size,
        "resize": resize_for(experiment.image_size),
        "image_mode": experiment.image_mode,  # "L": decode as one channel
        "gray_input": experiment.gray_input,  # how the network takes one channel (tuning.lib.model)
        "mean": list(backbone.mean),
        "std": list(backbone.std),
        "hparams": lead.config,
        # the final model's on val, calibrated; the lead member's own report as val_acc_reported, val_loss_reported
        "metrics": {M.VAL_ACC: final.val["acc"], M.VAL_LOSS: final.val["nll"], "val_ece": final.val["ece"],
                    M.EPOCH: lead.metrics.get(M.EPOCH, 0), "val_acc_reported": lead.metrics.get(M.VAL_ACC),
                    "val_loss_reported": lead.metrics.get(M.VAL_LOSS)},
        "trial_id": lead.trial_id if final.kind != "ensemble" else "ensemble",
        "experiment": experiment.name,
    }
    meta["final"] = final_meta(final)
    meta["onnx"] = onnx_meta(meta)
    meta["plain"] = plain_meta(meta)
    state = final_state(final, meta)
    versions = run_dir / ".exports"
    versions.mkdir(parents=True, exist_ok=True)
    version = Path(tempfile.mkdtemp(prefix="best-", dir=versions))
    try:
        torch.save(state, version / MODEL_FILE)
        if final.kind != "ensemble":
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


def plain_meta(meta: dict[str, Any]) -> dict[str, Any] | None:
    """How model_plain.pt loads without this package, for model.json (none for an ensemble)."""
    if meta.get("final", {}).get("kind") == "ensemble":
        return None
    repeat = meta["image_mode"] == "L" and meta["gray_input"] == "repeat"
    temperature = meta.get("final", {}).get("temperature") or 1.0
    return {
        "file": PLAIN_FILE,
        "build": plain_constructor(meta),
        "load": f"net.load_state_dict(torch.load({PLAIN_FILE!r}, weights_only=True), strict=True)",
        "input": "float NCHW crops as for model.onnx, scaled to 0..1 and normalised with `mean` and `std`"
                 + (" (gray: their averages), the gray channel repeated 3 times" if repeat else ""),
        "output": f"logits: divide them by the temperature {temperature:.4g} before the softmax (calibration)"
                  + (", after averaging them with the logits of the crop's left-right mirror image"
                     if meta.get("final", {}).get("mirror") else ""),
    }


def member_net(meta: dict[str, Any], freeze_depth: int, state: dict[str, torch.Tensor] | None) -> FineTuneNet:
    mode = meta.get("image_mode", "RGB")
    model = build_model(meta["backbone"], len(meta["classes"]), weights=None, freeze_depth=freeze_depth,
                        image_mode=mode, gray_input=meta.get("gray_input", "sum"))
    if state is not None:
        model.load_state_dict(state)
    return model.eval()


def rebuild(meta: dict[str, Any], state: dict[str, torch.Tensor]) -> tuple[Ensemble, Normalize]:
    """The eval-mode final model (log-probabilities out) and its normalisation, from model.json's
    fields and model.pt. An export without `final` (an older one) is one network at temperature 1."""
    final = meta.get("final") or {}
    norm = Normalize.for_mode(tuple(meta["mean"]), tuple(meta["std"]), meta.get("image_mode", "RGB"))
    if final.get("kind") == "ensemble":
        members = final["members"]
        model = Ensemble([member_net(meta, m["freeze_depth"], None) for m in members],
                         [m["weight"] for m in members], [m["temperature"] for m in members], bool(final.get("mirror")))
        model.load_state_dict(state)
    else:
        model = Ensemble([member_net(meta, 0, state)], [1.0], [final.get("temperature") or 1.0], bool(final.get("mirror")))
    return model.eval(), norm


def load_exported(export_dir: Path) -> tuple[Ensemble, dict[str, Any], Normalize]:
    meta_path, model_path = export_dir / META_FILE, export_dir / MODEL_FILE
    if not meta_path.is_file() or not model_path.is_file():
        raise UsageError(f"{export_dir} is not an export: it lacks {META_FILE} or {MODEL_FILE}")
    meta = json.loads(meta_path.read_text())
    model, norm = rebuild(meta, torch.load(model_path, map_location="cpu", weights_only=True))
    return model, meta, norm


@torch.no_grad()
def log_probs_of(model: Ensemble, norm: Normalize, images: Sequence[np.ndarray], size: int, batch_size: int = 16) -> np.ndarray:
    """(N, classes) log-probabilities of decoded images, centre-cropped as validation's."""
    x = eval_batch(images, size)
    return torch.cat([model(norm(x[i : i + batch_size])) for i in range(0, len(x), batch_size)]).double().numpy()


def score_on_test(export_dir: Path, test: Split) -> dict[str, float]:
    """Accuracy, NLL and ECE of the exported model on the test split, preprocessed as validation
    is, recorded in the export's metrics. Called once, after the search: test never informs a choice."""
    model, meta, norm = load_exported(export_dir)
    scores = C.scores(log_probs_of(model, norm, test.images, meta["image_size"]), np.asarray(test.labels))
    test_metrics = {M.TEST_ACC: scores["acc"], "test_nll": scores["nll"], "test_ece": scores["ece"]}
    add_metrics(export_dir, test_metrics)
    return test_metrics
