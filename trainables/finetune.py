"""The Ray Tune function trainable: fine-tune one configuration, report every epoch.

Decoded images come memory-mapped from the store (decoded once per machine), and a frozen prefix's
outputs from the shared feature cache, so a trial's own work is only the trainable stages'. Each
epoch: train, validate, report metrics and a checkpoint; a restarted trial resumes from
`tune.get_checkpoint()`.
"""
from __future__ import annotations

import json
import math
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import ray
import torch
from ray import tune
from torch import nn

from experiments.base import Experiment
from trainables.inputs import TrialData, TrialInputs
from tuning.lib import metrics as M
from tuning.lib.allocator import release_memory
from tuning.lib.backbones import BACKBONES
from tuning.lib.checkpoint import Feed, autocast, evaluate_logits, load_state, save_state
from tuning.lib.cost import rung_pauses, rungs, steps_per_epoch
from tuning.lib.data.transforms import Normalize
from tuning.lib.footprint import micro_batches
from tuning.lib.hparams import HParams
from tuning.lib.model import FineTuneNet, build_model

Pause = Callable[[int, float, float], None]  # (steps done this epoch, mean train loss, images/s)


def finetune(
    config: dict[str, Any], *, experiment: Experiment, data: TrialData, weights: str | None,
    head_init: dict[str, np.ndarray] | None = None,
) -> None:
    """`head_init`: the linear probe's head (tuning.lib.probe), which trials start from instead of
    a random head (LP-FT; the seeds' recipe may keep the seeds' random head: `initial_head`)."""
    try:
        fit(config, experiment, data, weights, head_init)
    finally:  # completed, diverged, raised, or stopped by ASHA (SystemExit from tune.report)
        release_memory()


def fit(
    config: dict[str, Any], experiment: Experiment, data: TrialData, weights: str | None,
    head_init: dict[str, np.ndarray] | None = None,
) -> None:
    hp = HParams.from_config(config)
    device = select_device()
    dataset = data.store.open()
    spec = BACKBONES.get(experiment.backbone)
    # from the configuration, not Ray's random trial id: the same --seed trains the same way. Seeded
    # before the fresh head is drawn: a reused worker's RNG state depends on the trials it ran before.
    trial_seed = experiment.seed + zlib.crc32(json.dumps(config, sort_keys=True).encode())
    torch.manual_seed(trial_seed)
    model = build_model(
        experiment.backbone, len(dataset.classes), Path(weights) if weights else None, hp.freeze_depth,
        image_mode=experiment.image_mode, gray_input=experiment.gray_input,
    )
    head = initial_head(config, experiment, head_init)
    if head is not None:
        model.head.load_state_dict({k: torch.tensor(v) for k, v in head.items()})
    model = model.to(device)  # channels_last, as build_model makes it
    optimizer = build_optimizer(model, hp)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=experiment.epochs)
    start, first_step = restore(model, optimizer, schedule)

    norm = Normalize.for_mode(spec.mean, spec.std, experiment.image_mode)
    inputs = TrialInputs(dataset, experiment, model, norm, data.cache, device)
    val = inputs.val()
    node = ray.get_runtime_context().get_node_id()
    epoch_cost = data.epoch_costs[hp.freeze_depth] if data.epoch_costs else 1.0
    step_images = data.step_images[hp.freeze_depth] if data.step_images else None
    milestones = rungs(experiment.grace_period, experiment.reduction_factor, experiment.epochs)
    steps = steps_per_epoch(len(dataset.splits["train"].labels), hp.batch_size)

    def metrics(epoch: float, train_loss: float, images_per_s: float) -> dict[str, Any]:
        return {M.EPOCH: round(epoch, 3), M.COST: epoch * epoch_cost, M.TRAIN_LOSS: train_loss,
                M.IMAGES_PER_S: images_per_s, M.NODE_ID: node,
                **{f"lr_{group['name']}": group["lr"] for group in optimizer.param_groups}}  # M.LR_*, this epoch's

    for epoch in range(start, experiment.epochs):
        torch.manual_seed(trial_seed + epoch)

        def pause(done: int, train_loss: float, images_per_s: float, epoch: int = epoch) -> None:
            """A rung inside this epoch: validate and report there (tuning.lib.cost.rung_pauses)."""
            val_loss, val_acc, logits = evaluate_logits(model, val)
            report(model, optimizer, schedule, (epoch, done), {
                M.VAL_ACC: val_acc, M.VAL_LOSS: val_loss, **metrics(epoch + done / steps, train_loss, images_per_s)},
                logits)

        train_loss, images_per_s = train_one_epoch(
            model, optimizer, inputs.train(epoch), hp.batch_size, step_images,
            first_step=first_step if epoch == start else 0,
            pauses=rung_pauses(epoch_cost, epoch, milestones, steps), pause=pause,
        )
        if not math.isfinite(train_loss):
            # Diverged: end the trial as the worst possible result, which ASHA and Optuna still
            # learn from. No checkpoint and no exception, so no retry storm.
            tune.report({M.VAL_ACC: 0.0, M.VAL_LOSS: float("nan"), **metrics(epoch + 1, train_loss, images_per_s)})
            return
        done = metrics(epoch + 1, train_loss, images_per_s)  # before the step: the learning rates trained with
        schedule.step()
        val_loss, val_acc, logits = evaluate_logits(model, val)
        report(model, optimizer, schedule, (epoch + 1, 0), {M.VAL_ACC: val_acc, M.VAL_LOSS: val_loss, **done}, logits)


def initial_head(
    config: dict[str, Any], experiment: Experiment, probe_head: dict[str, np.ndarray] | None
) -> dict[str, np.ndarray] | None:
    """The probe's head (LP-FT), or None (a fresh random head) for the seeds' recipe where the
    experiment says so (`Experiment.recipe_head`): LP-FT does not suit every recipe."""
    if experiment.recipe_head == "random" and experiment.is_recipe(config):
        return None
    return probe_head


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
    model: FineTuneNet, optimizer: torch.optim.Optimizer, feed: Feed, batch_size: int, step_images: int | None = None,
    *, first_step: int = 0, pauses: Sequence[int] = (), pause: Pause | None = None,
) -> tuple[float, float]:
    """One optimizer step per batch; a batch larger than `step_images` runs as micro-batches whose
    losses are weighted by their share of the batch, so the summed gradient is the whole batch's.
    Only BatchNorm differs: its statistics are each micro-batch's (as in ghost batch norm).
    After step k in `pauses`, `pause(k, mean loss so far, images/s)` validates and reports mid-epoch;
    a trial resumed from such a report starts at `first_step` (the batch order is the epoch's own)."""
    model.train()
    device = feed.labels.device
    loss_fn = nn.CrossEntropyLoss()
    order = torch.randperm(len(feed)).tolist()
    total, seen, start = 0.0, 0, time.perf_counter()
    for step in range(first_step, steps_per_epoch(len(order), batch_size)):  # without a ragged tail of one
        idx = order[step * batch_size : (step + 1) * batch_size]
        optimizer.zero_grad(set_to_none=True)
        offset = 0
        for size in micro_batches(len(idx), step_images or len(idx)):
            part = idx[offset : offset + size]
            offset += size
            x, y = feed.batch(part).to(device, non_blocking=True), feed.labels[part]
            with autocast(device):
                loss = loss_fn(model.trainable_forward(x).float(), y)
            if not torch.isfinite(loss):
                return float("nan"), seen / (time.perf_counter() - start)
            (loss * (size / len(idx))).backward()
            total += loss.item() * size
        optimizer.step()
        seen += len(idx)
        if pause is not None and step + 1 in pauses:
            pause(step + 1, total / seen, seen / (time.perf_counter() - start))
            model.train()
    return total / max(seen, 1), seen / (time.perf_counter() - start)


def report(model, optimizer, schedule, at: tuple[int, int], result: dict[str, Any], val_logits: torch.Tensor) -> None:
    """`at`: (epochs done, steps done in the next): where a restarted trial continues."""
    with tempfile.TemporaryDirectory() as tmp:
        save_state(tmp, model, optimizer, schedule, *at, val_logits=val_logits)
        tune.report(result, checkpoint=tune.Checkpoint.from_directory(tmp))


def restore(model, optimizer, schedule) -> tuple[int, int]:
    """The epoch and step to start from: (0, 0), or where the last checkpoint of a restarted trial was taken."""
    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        return 0, 0
    with checkpoint.as_directory() as path:
        state = load_state(path)
    model.load_state_dict(state["model"])
    optimizer.load_state_dict(state["optimizer"])
    schedule.load_state_dict(state["schedule"])
    return int(state["epoch"]), int(state.get("steps", 0))
