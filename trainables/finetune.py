"""The Ray Tune function trainable: fine-tune one configuration, report every epoch.

Decoded images arrive through Ray's object store (decoded once by the driver), so a trial's work
is only the network's. Each epoch: train, validate, report metrics and a checkpoint; a restarted
trial resumes from `tune.get_checkpoint()`.
"""
from __future__ import annotations

import json
import math
import os
import tempfile
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray
import torch
from ray import tune
from torch import nn

from experiments.base import Experiment
from tuning import metrics as M
from tuning.backbones import BACKBONES
from tuning.datasets import Dataset, Split
from tuning.hparams import HParams
from tuning.images import Normalize, TrainAugment, eval_batch
from tuning.model import FineTuneNet, build_model

CHECKPOINT_FILE = "state.pt"
FAULT_ENV = "TUNING_TEST_FAULT"


@dataclass(frozen=True)
class SharedData:
    """The decoded dataset in Ray's object store. Wrapping the reference keeps `with_parameters`
    from serialising the images a second time; trials read them zero-copy."""

    ref: ray.ObjectRef

    def get(self) -> Dataset:
        return ray.get(self.ref)


def finetune(
    config: dict[str, Any], *, experiment: Experiment, data: SharedData, weights: str | None
) -> None:
    hp = HParams.from_config(config)
    device = select_device()
    dataset = data.get()
    train, val = dataset.splits["train"], dataset.splits["val"]
    spec = BACKBONES.get(experiment.backbone)
    norm = Normalize(spec.mean, spec.std)

    model = build_model(
        experiment.backbone, len(dataset.classes), Path(weights) if weights else None, hp.freeze_depth
    ).to(device)
    optimizer = build_optimizer(model, hp)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=experiment.epochs)
    start = restore(model, optimizer, schedule)

    augment = TrainAugment(experiment.image_size)
    val_x = eval_batch(val.images, experiment.image_size)
    val_y = torch.from_numpy(val.labels)
    # from the configuration, not Ray's random trial id: the same --seed trains the same way
    trial_seed = experiment.seed + zlib.crc32(json.dumps(config, sort_keys=True).encode())
    node = ray.get_runtime_context().get_node_id()
    for epoch in range(start, experiment.epochs):
        torch.manual_seed(trial_seed + epoch)
        train_loss, images_per_s = train_one_epoch(
            model, optimizer, train, augment, norm, hp.batch_size, device, epoch, config
        )
        if not math.isfinite(train_loss):
            # Diverged: end the trial as the worst possible result, which ASHA and Optuna still
            # learn from. No checkpoint and no exception, so no retry storm.
            tune.report({M.VAL_ACC: 0.0, M.VAL_LOSS: float("nan"), M.TRAIN_LOSS: train_loss,
                         M.EPOCH: epoch + 1, M.IMAGES_PER_S: images_per_s, M.NODE_ID: node})
            return
        schedule.step()
        val_loss, val_acc = evaluate(model, val_x, val_y, norm, device)
        report(model, optimizer, schedule, epoch, {
            M.VAL_ACC: val_acc, M.VAL_LOSS: val_loss, M.TRAIN_LOSS: train_loss,
            M.EPOCH: epoch + 1, M.IMAGES_PER_S: images_per_s, M.NODE_ID: node,
        })


def select_device() -> torch.device:
    """Limit torch to the trial's CPU allotment (two trials on two cores must not fight for four
    threads) and use a GPU only when Ray assigned one."""
    resources = tune.get_context().get_trial_resources().required_resources
    torch.set_num_threads(max(1, int(resources.get("CPU", 1))))
    if resources.get("GPU", 0) > 0 and torch.cuda.is_available():
        return torch.device("cuda")
    return torch.device("cpu")


def build_optimizer(model: FineTuneNet, hp: HParams) -> torch.optim.Optimizer:
    """SGD with momentum (seeds 003/004) or Adam (seeds 000/001), over the head and backbone
    groups; weight decay is L2 in both, as the seeds' torch.optim calls have it."""
    groups = model.param_groups(hp.lr, hp.head_lr_mult, hp.weight_decay)
    if hp.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=hp.lr, momentum=hp.momentum)
    if hp.optimizer == "adam":
        return torch.optim.Adam(groups, lr=hp.lr)
    raise ValueError(f"optimizer {hp.optimizer!r} is neither 'sgd' nor 'adam'")


def train_one_epoch(
    model: FineTuneNet, optimizer: torch.optim.Optimizer, split: Split, augment: TrainAugment,
    norm: Normalize, batch_size: int, device: torch.device, epoch: int, config: dict[str, Any] | None = None,
) -> tuple[float, float]:
    model.train()
    loss_fn = nn.CrossEntropyLoss()
    order = torch.randperm(len(split)).tolist()
    total, seen, start = 0.0, 0, time.perf_counter()
    for i in range(0, len(order), batch_size):
        idx = order[i : i + batch_size]
        if len(idx) < 2 and seen:  # a batch of one breaks BatchNorm; drop the ragged tail
            break
        x = norm(augment([split.images[j] for j in idx]).to(device))
        y = torch.from_numpy(split.labels[idx]).to(device)
        loss = _inject_fault(loss_fn(model(x), y), epoch, config or {})
        if not torch.isfinite(loss):
            return float("nan"), seen / (time.perf_counter() - start)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(idx)
        seen += len(idx)
    return total / max(seen, 1), seen / (time.perf_counter() - start)


@torch.no_grad()
def evaluate(
    model: nn.Module, x_uint8: torch.Tensor, y: torch.Tensor, norm: Normalize, device: torch.device,
    batch_size: int = 64,
) -> tuple[float, float]:
    """Mean cross-entropy and accuracy over eval images (uint8 NCHW, already cropped)."""
    model.eval()
    loss_sum, correct = 0.0, 0
    for i in range(0, len(y), batch_size):
        logits = model(norm(x_uint8[i : i + batch_size].to(device)))
        target = y[i : i + batch_size].to(device)
        loss_sum += nn.functional.cross_entropy(logits, target, reduction="sum").item()
        correct += (logits.argmax(1) == target).sum().item()
    return loss_sum / len(y), correct / len(y)


def report(model, optimizer, schedule, epoch: int, result: dict[str, float]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        torch.save(
            {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
             "schedule": schedule.state_dict(), "epoch": epoch + 1},
            os.path.join(tmp, CHECKPOINT_FILE),
        )
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(tmp))


def restore(model, optimizer, schedule) -> int:
    """The epoch to start from: 0, or the one after the last checkpoint of a restarted trial."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return 0
    with checkpoint.as_directory() as path:
        state = load_state(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return int(state["epoch"])


def _inject_fault(loss: torch.Tensor, epoch: int, config: dict[str, Any]) -> torch.Tensor:
    """Test-only hook, read from $TUNING_TEST_FAULT = KIND[,PARAM=VALUE]: `nan` makes every loss
    NaN; `raise@E` raises in epoch E on a trial's first attempt only (a retry can succeed);
    `raise-always@E` raises in epoch E on every attempt. With `,PARAM=VALUE` only trials whose
    hyperparameter PARAM has that value are hit."""
    spec, _, condition = os.environ.get(FAULT_ENV, "").partition(",")
    if condition:
        key, _, value = condition.partition("=")
        if str(config.get(key)) != value:
            return loss
    if spec == "nan":
        return loss * float("nan")
    kind, _, at = spec.partition("@")
    if kind in ("raise", "raise-always") and epoch == int(at):
        marker = Path(tune.get_context().get_trial_dir()) / ".fault_injected"
        if kind == "raise-always" or not marker.exists():
            marker.touch()
            raise RuntimeError(f"injected fault in epoch {epoch}")
    return loss


def load_state(checkpoint_dir: str | Path) -> dict[str, Any]:
    return torch.load(Path(checkpoint_dir) / CHECKPOINT_FILE, map_location="cpu", weights_only=True)

