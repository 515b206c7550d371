"""The search's first step: the linear probe, fitted in the driver before any trial trains.

Its features go through the shared feature cache (fully frozen, pooled), so the trials at full
freeze depth find the val features already there. The probe is written to the run dir
(`probe/state.pt`, a checkpoint of the whole network with the probe's head, and `probe.json`)
so that the export can choose it when no trial beats it, and the report can show it."""
from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from experiments.base import Experiment
from trainables.inputs import TrialInputs
from tuning.lib import metrics as M
from tuning.lib.backbones import BACKBONES
from tuning.lib.checkpoint import CHECKPOINT_FILE, VAL_LOGITS_FILE, Feed, forward_batch_size
from tuning.lib.data.decode import Dataset
from tuning.lib.data.transforms import Normalize
from tuning.lib.features import FeatureCache
from tuning.lib.files import atomic_path, write_atomic
from tuning.lib.model import build_model
from tuning.lib.probe import Probe, fit_probe

PROBE_DIR = "probe"
PROBE_FILE = "probe.json"
PROBE_ID = "probe"  # its trial id in results and exports
PROBE_ONLY = ("linear_probe_l2", "linear_probe_standardized")  # its hyperparameters that no trial has


@dataclass(frozen=True)
class ProbeResult:
    probe: Probe
    freeze_depth: int
    seconds: float  # to fit, features included
    timestamp: float  # when it was known (unix time)
    val_logits: np.ndarray | None = None  # (val images, classes): a candidate of the final model
    mirrored: bool = False  # val_logits average each image's and its mirror's (the final model's `mirror`)

    @property
    def config(self) -> dict:
        return {PROBE_ONLY[0]: self.probe.l2, PROBE_ONLY[1]: self.probe.standardized, "freeze_depth": self.freeze_depth}

    @property
    def metrics(self) -> dict:
        return {M.VAL_ACC: self.probe.val_acc, M.VAL_LOSS: self.probe.val_loss, M.EPOCH: 0}


def features(feed: Feed) -> torch.Tensor:
    step = forward_batch_size(torch.device("cpu"))
    return torch.cat([feed.batch(range(i, min(len(feed), i + step))).float() for i in range(0, len(feed), step)])


def fit(
    experiment: Experiment, data: Dataset, weights: Path | None, cache: FeatureCache | None
) -> tuple[ProbeResult, torch.nn.Module]:
    """The probe, and the whole network with the probe's head (what the export takes if it wins)."""
    started = time.time()
    spec = BACKBONES.get(experiment.backbone)
    model = build_model(experiment.backbone, len(data.classes), weights, spec.num_stages,
                        image_mode=experiment.image_mode, gray_input=experiment.gray_input)
    norm = Normalize.for_mode(spec.mean, spec.std, experiment.image_mode)
    inputs = TrialInputs(data, experiment, model, norm, cache, torch.device("cpu"))
    train, val = inputs.train_centre(), inputs.val()
    train_x, train_y, val_x = features(train), train.labels, features(val)
    if experiment.hflip:
        # a mirror image is another training example of its class, as in the trials' flipped views, and the
        # final model averages over an image and its mirror: the head is fitted and chosen on both
        train_x, train_y = torch.cat([train_x, features(inputs.train_centre(mirror=True))]), torch.cat([train_y, train_y])
        val_x = (val_x + features(inputs.val(mirror=True))) / 2  # linear head: the mean feature gives the mean logits
    probe = fit_probe(train_x, train_y, val_x, val.labels, len(data.classes))
    model.head.load_state_dict(probe.head_state())
    val_logits = (val_x @ probe.weight.T + probe.bias).numpy().astype(np.float32)
    result = ProbeResult(probe, spec.num_stages, time.time() - started, time.time(), val_logits, experiment.hflip)
    return result, model


def save(result: ProbeResult, model: torch.nn.Module, run_dir: Path) -> None:
    folder = run_dir / PROBE_DIR
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / CHECKPOINT_FILE) as tmp:
        torch.save({"model": model.state_dict(), "epoch": 0}, tmp)
    if result.val_logits is not None:
        with atomic_path(folder / VAL_LOGITS_FILE) as tmp, open(tmp, "wb") as f:
            np.save(f, result.val_logits)
    write_atomic(run_dir / PROBE_FILE, json.dumps({
        "trial_id": PROBE_ID, "config": result.config, "metrics": result.metrics,
        "seconds": result.seconds, "timestamp": result.timestamp,
    }, indent=2))


def load_record(run_dir: Path) -> dict | None:
    path = run_dir / PROBE_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def head_of(result: ProbeResult) -> dict[str, np.ndarray]:
    """The head's tensors as numpy arrays: small, and cheap to hand to every trial."""
    return {k: v.numpy() for k, v in result.probe.head_state().items()}
