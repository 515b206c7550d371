"""Where a trial's batches come from: decoded images in the memory-mapped store, the epoch's fixed
training views, and, for a frozen prefix, the shared feature cache instead of the frozen stages."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch

from experiments.base import Experiment
from tuning.lib.checkpoint import Feed, forward_batch_size
from tuning.lib.data.decode import Dataset
from tuning.lib.data.decoded_store import StoreHandle
from tuning.lib.data.transforms import Normalize, TrainViews, as_tensor, eval_batch
from tuning.lib.features import FeatureCache
from tuning.lib.model import FineTuneNet


@dataclass(frozen=True)
class TrialData:
    """Handed to every trial through `tune.with_parameters`: small, no pixels in it."""

    store: StoreHandle
    cache: FeatureCache | None  # None: --feature-cache-gb 0, or frozen stages not shared (no pretraining)
    epoch_costs: tuple[float, ...] = ()  # an epoch's cost by freeze depth (tuning.lib.cost); () = 1 each
    step_images: tuple[int, ...] = ()  # the most images per forward/backward by freeze depth (micro-batches); () = a whole batch


class TrialInputs:
    def __init__(
        self, dataset: Dataset, experiment: Experiment, model: FineTuneNet, norm: Normalize,
        cache: FeatureCache | None, device: torch.device,
    ) -> None:
        self.train_split, val = dataset.splits["train"], dataset.splits["val"]
        self.views = TrainViews(experiment.image_size, tuple(experiment.crop_scale), experiment.hflip, experiment.seed)
        self.train_views = experiment.train_views
        self.model, self.norm, self.cache, self.device = model, norm, cache, device
        # validation crops are the same every epoch: cut once, kept on the device
        self.val_x = eval_batch(val.images, experiment.image_size).to(device)
        self.val_y = torch.from_numpy(np.asarray(val.labels)).to(device)
        self.train_y = torch.from_numpy(np.asarray(self.train_split.labels)).to(device)

    def _input(self, uint8: torch.Tensor) -> torch.Tensor:
        return self.norm(uint8.to(self.device, non_blocking=True))  # the model converts to its layout

    def view_of(self, epoch: int) -> int:
        """Which of the fixed views epoch `epoch` trains on (`Experiment.train_views`)."""
        return epoch % self.train_views if self.train_views else epoch

    def train(self, epoch: int) -> Feed:
        images, view = self.train_split.images, self.view_of(epoch)
        return self._feed(f"train-e{view}", self.train_y,
                          lambda idx: self._input(self.views.batch(images, idx, view)))

    def val(self, mirror: bool = False) -> Feed:
        """Validation's centre crops, or with `mirror` their left-right mirror images."""
        crops = self.val_x.flip(-1) if mirror else self.val_x
        return self._feed("val-mirror" if mirror else "val", self.val_y, lambda idx: self._input(crops[list(idx)]))

    def train_centre(self, mirror: bool = False) -> Feed:
        """Training images as validation sees them (centre crops), or mirrored: what the linear probe fits on."""
        crops = eval_batch(self.train_split.images, self.val_x.shape[-1])
        crops = crops.flip(-1) if mirror else crops
        return self._feed("train-centre-mirror" if mirror else "train-centre", self.train_y,
                          lambda idx: self._input(crops[list(idx)]))

    @functools.cached_property
    def cacheable_depths(self) -> tuple[int, ...]:
        """Depths whose prefix output is no larger than the input (fully frozen: the pooled vector).
        A larger one (EfficientNet's stem and first block, at 2.7x and 1.3x) saves a few percent of
        the compute for more memory traffic than it saves."""
        size = self.val_x.shape[1:]
        kept = self._outputs_through_all(self._input(torch.zeros(1, *size, dtype=torch.uint8)))
        stages = len(self.model.stages)
        return (*(d for d in range(1, stages) if kept[d].numel() <= size.numel()), stages)

    def _outputs_through_all(self, x: torch.Tensor) -> dict[int, torch.Tensor]:
        """Every stage's output for `x`, in eval mode (no BatchNorm statistics move), no gradients."""
        depth, training = self.model.freeze_depth, self.model.training
        try:
            self.model.eval()
            self.model.freeze_depth = len(self.model.stages)
            return self.model.frozen_features_keeping(x, keep=tuple(range(1, len(self.model.stages))))[1]
        finally:
            self.model.freeze_depth = depth
            self.model.train(training)

    def _worth_caching(self) -> bool:
        return self.model.freeze_depth in self.cacheable_depths

    def _feed(self, view: str, labels: torch.Tensor, raw: Callable[[Sequence[int]], torch.Tensor]) -> Feed:
        model, depth = self.model, self.model.freeze_depth
        if depth > 0 and self.cache is not None and self._worth_caching():
            features = self.cache.get(model, depth, view, len(labels), raw, forward_batch_size(self.device),
                                      also=tuple(d for d in self.cacheable_depths if d < depth))
            if features is not None:
                if self.device.type == "cuda":  # one copy per epoch, then batches never leave the GPU
                    resident = as_tensor(np.ascontiguousarray(features)).to(self.device)
                    return Feed(labels, lambda idx: resident[list(idx)], True)
                return Feed(labels, lambda idx: torch.from_numpy(np.asarray(features[np.asarray(idx)])), True)
        return Feed(labels, lambda idx: model.frozen_features(raw(idx)), False)
