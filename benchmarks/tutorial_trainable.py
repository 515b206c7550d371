"""The seeds' training loop as a Ray Tune trainable: the baseline of benchmarks/search.py.

What the tutorials do, per trial: torchvision ImageFolder + DataLoader that opens and decodes every
JPEG every epoch, RandomResizedCrop + flip on PIL images, a full forward pass every step (frozen
stages included), validation the same way. The network, optimizer, schedule, metrics and
checkpoints are ours, so the two arms differ only in how the data reaches the model and in the
network's memory layout (the seeds' default NCHW here; ours runs channels_last).
"""
from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any

import torch
import torchvision
from ray import tune
from torch import nn
from torchvision import transforms

from experiments.base import Experiment
from trainables.finetune import build_optimizer, report, select_device
from tuning.app.search import Placement
from tuning.lib import calibration as C
from tuning.lib import metrics as M
from tuning.lib.backbones import BACKBONES
from tuning.lib.data.sources import DATASETS
from tuning.lib.data.transforms import resize_for
from tuning.lib.hparams import HParams
from tuning.lib.model import build_model


def tutorial(config: dict[str, Any], *, experiment: Experiment, folder: str, weights: str) -> None:
    """The seeds' loop. Where `folder` has a test split, the test images are scored at each epoch
    that beats the trial's best val_acc (the epoch the seeds keep) and reported beside it as
    best_test_*: the tutorial's final model judged on held-out data; no choice reads them."""
    hp = HParams.from_config(config)
    device = select_device()
    spec = BACKBONES.get(experiment.backbone)
    size = experiment.image_size
    norm = transforms.Normalize(spec.mean, spec.std)
    train_tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                                   transforms.ToTensor(), norm])
    val_tf = transforms.Compose([transforms.Resize(resize_for(size)), transforms.CenterCrop(size),
                                 transforms.ToTensor(), norm])
    rgb = lambda path: torchvision.datasets.folder.pil_loader(path)  # noqa: E731 (GIFs become RGB)
    train = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(f"{folder}/train", train_tf, loader=rgb),
                                        batch_size=hp.batch_size, shuffle=True, drop_last=True)
    val = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(f"{folder}/val", val_tf, loader=rgb),
                                      batch_size=64)
    test = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(f"{folder}/test", val_tf, loader=rgb),
                                       batch_size=64) if Path(folder, "test").is_dir() else None
    classes = len(train.dataset.classes)
    # the seeds' layout: PyTorch's default NCHW (ours runs channels_last, tuning.lib.model)
    model = build_model(experiment.backbone, classes, Path(weights), hp.freeze_depth, channels_last=False).to(device)
    optimizer = build_optimizer(model, hp)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=experiment.epochs)
    loss_fn = nn.CrossEntropyLoss()
    best, at_best = -1.0, {}
    for epoch in range(experiment.epochs):
        model.train()
        total, seen = 0.0, 0
        for x, y in train:
            loss = loss_fn(model(x.to(device)), y.to(device))
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total, seen = total + loss.item() * len(y), seen + len(y)
        schedule.step()
        val_logits, val_labels = predict(model, val, device)
        val_loss = nn.functional.cross_entropy(val_logits, val_labels).item()
        train_loss = total / max(seen, 1)
        val_acc = (val_logits.argmax(1) == val_labels).float().mean().item() if math.isfinite(train_loss) else 0.0
        if val_acc > best:  # the seeds keep the first epoch that reaches their best val_acc
            best = val_acc
            if test is not None:
                test_logits, test_labels = predict(model, test, device)
                scores = C.scores(C.log_probs(test_logits.numpy()), test_labels.numpy())
                at_best = {"best_val_loss": val_loss, **{f"best_test_{k}": v for k, v in scores.items()}}
        report(model, optimizer, schedule, (epoch + 1, 0), {
            M.VAL_ACC: val_acc, M.VAL_LOSS: val_loss, M.TRAIN_LOSS: train_loss, M.EPOCH: epoch + 1,
            "best_val_acc": best, **at_best,
        }, val_logits)
        if not math.isfinite(train_loss):
            return


@torch.no_grad()
def predict(model: nn.Module, loader: torch.utils.data.DataLoader, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    model.eval()
    out = [(model(x.to(device)).float().cpu(), y) for x, y in loader]
    return torch.cat([o for o, _ in out]), torch.cat([y for _, y in out])


def make_tutorial_trainable(experiment: Experiment, placement: Placement, data_root: Path | None,
                            folder: Path | None = None) -> tune.Trainable:
    """`folder`: the dataset's own folder ({train,val[,test]}/CLASS/*), else the registered dataset's under `data_root`."""
    folder = folder or Path(data_root) / DATASETS.get(experiment.dataset).dirname
    weights = BACKBONES.get(experiment.backbone).default_weights()
    return tune.with_resources(
        tune.with_parameters(tutorial, experiment=experiment, folder=str(folder.resolve()), weights=str(weights)),
        {"cpu": placement.cpus_per_trial, "gpu": placement.gpus_per_trial},
    )


def tutorial_tuner(experiment: Experiment, storage: str, data_root: Path | None = None,
                   folder: Path | None = None, max_concurrent: int = 2) -> tune.Tuner:
    """The tutorial-style search as a Ray Tune user would write it: OptunaSearch with the recipe
    first, epoch-based ASHA (grace 1, reduction 3), two trials at a time (one where two full
    fine-tunings outgrow the machine's memory), over the seeds' loop."""
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.optuna import OptunaSearch

    from search_spaces import space_for

    # the machine's CPUs shared by the trials that run at once (one trial alone gets every thread)
    placement = Placement(storage=storage, name="tutorial", cpus_per_trial=max(1, (os.cpu_count() or 1) // max_concurrent))
    searcher = OptunaSearch(space=space_for(experiment), metric="val_acc", mode="max", seed=experiment.seed,
                            points_to_evaluate=[dict(experiment.recipe)])
    scheduler = ASHAScheduler(time_attr="epoch", metric="val_acc", mode="max", max_t=experiment.epochs,
                              grace_period=1, reduction_factor=3)
    return tune.Tuner(
        make_tutorial_trainable(experiment, placement, data_root, folder),
        tune_config=tune.TuneConfig(search_alg=searcher, scheduler=scheduler, num_samples=experiment.samples,
                                    max_concurrent_trials=max_concurrent, reuse_actors=True),
        run_config=tune.RunConfig(name="tutorial", storage_path=str(Path(storage).resolve()), verbose=0,
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)),
    )
