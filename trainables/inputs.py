"""Where a trial's batches come from: decoded images in the memory-mapped store, the epoch's fixed
training views, and, for a frozen prefix, the shared feature cache instead of the frozen stages."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from experiments.base import Experiment
from tuning.datasets import Dataset
from tuning.features import FeatureCache
from tuning.images import Normalize, TrainViews, eval_batch
from tuning.model import FineTuneNet
from tuning.store import StoreHandle


def forward_batch_size(device: torch.device) -> int:
    """Images per forward pass without gradients (validation, filling the cache). On CPU, 16
    beats 64 by about 1.5x (EfficientNet-Lite0, 224 px, 2 threads: 29 vs 19 img/s, cache locality);
    a GPU wants large batches."""
    return 256 if device.type == "cuda" else 16


@dataclass(frozen=True)
class TrialData:
    """Handed to every trial through `tune.with_parameters`: small, no pixels in it."""

    store: StoreHandle
    cache: FeatureCache | None  # None: --feature-cache-gb 0, or frozen stages not shared (no pretraining)


@dataclass
class Feed:
    """One split as the trainable part of the network sees it: `batch(indices)` is the frozen
    prefix's output for those images (the normalised images themselves at depth 0)."""

    labels: torch.Tensor
    batch: Callable[[Sequence[int]], torch.Tensor]
    cached: bool

    def __len__(self) -> int:
        return len(self.labels)


class TrialInputs:
    def __init__(
        self, dataset: Dataset, experiment: Experiment, model: FineTuneNet, norm: Normalize,
        cache: FeatureCache | None, device: torch.device,
    ) -> None:
        self.train_split, val = dataset.splits["train"], dataset.splits["val"]
        self.views = TrainViews(experiment.image_size, tuple(experiment.crop_scale), experiment.hflip, experiment.seed)
        self.model, self.norm, self.cache, self.device = model, norm, cache, device
        # validation crops are the same every epoch: cut once, kept on the device
        self.val_x = eval_batch(val.images, experiment.image_size).to(device)
        self.val_y = torch.from_numpy(np.asarray(val.labels)).to(device)
        self.train_y = torch.from_numpy(np.asarray(self.train_split.labels)).to(device)

    def _input(self, uint8: torch.Tensor) -> torch.Tensor:
        return self.norm(uint8.to(self.device, non_blocking=True))  # the model converts to its layout

    def train(self, epoch: int) -> Feed:
        images = self.train_split.images
        return self._feed(f"train-e{epoch}", self.train_y,
                          lambda idx: self._input(self.views.batch(images, idx, epoch)))

    def val(self) -> Feed:
        return self._feed("val", self.val_y, lambda idx: self._input(self.val_x[list(idx)]))

    def _worth_caching(self) -> bool:
        """A prefix whose output is larger than its input (EfficientNet's stem and first block, at
        2.7x and 1.3x) saves a few percent of the compute for more memory traffic than it saves."""
        size = self.val_x.shape[1:]
        probe = self.model.frozen_features(self._input(torch.zeros(1, *size, dtype=torch.uint8)))
        return probe.numel() <= size.numel()

    def _feed(self, view: str, labels: torch.Tensor, raw: Callable[[Sequence[int]], torch.Tensor]) -> Feed:
        model, depth = self.model, self.model.freeze_depth
        if depth > 0 and self.cache is not None and self._worth_caching():
            features = self.cache.get(model, depth, view, len(labels), raw, forward_batch_size(self.device))
            if features is not None:
                if self.device.type == "cuda":  # one copy per epoch, then batches never leave the GPU
                    resident = torch.from_numpy(np.ascontiguousarray(features)).to(self.device)
                    return Feed(labels, lambda idx: resident[list(idx)], True)
                return Feed(labels, lambda idx: torch.from_numpy(np.asarray(features[np.asarray(idx)])), True)
        return Feed(labels, lambda idx: model.frozen_features(raw(idx)), False)
