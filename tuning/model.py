"""The fine-tuning network: a staged pretrained backbone and a fresh linear head.

Stages are the unit of `freeze_depth`: the first k stages are frozen (no gradients, BatchNorm in
eval mode, run under no_grad), the rest and the head train. The head trains at lr x head_lr_mult."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tuning.backbones import BACKBONES, load_pretrained


class FineTuneNet(nn.Module):
    def __init__(self, stages: list[nn.Module], num_features: int, num_classes: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(num_features, num_classes)
        nn.init.xavier_uniform_(self.head.weight)  # as seed 004
        nn.init.zeros_(self.head.bias)
        self.freeze_depth = 0

    def freeze(self, depth: int) -> "FineTuneNet":
        if not 0 <= depth <= len(self.stages):
            raise ValueError(f"freeze_depth {depth} outside 0..{len(self.stages)}")
        self.freeze_depth = depth
        for i, stage in enumerate(self.stages):
            stage.requires_grad_(i >= depth)
        return self.train(self.training)

    def train(self, mode: bool = True) -> "FineTuneNet":
        super().train(mode)
        for stage in self.stages[: self.freeze_depth]:
            stage.eval()  # frozen BatchNorm keeps its ImageNet statistics
        return self

    @property
    def fully_frozen(self) -> bool:
        return self.freeze_depth == len(self.stages)

    def frozen_features(self, x: torch.Tensor, start: int = 0) -> torch.Tensor:
        """The frozen prefix's output: what tuning.features caches and shares between trials.
        `start` > 0 continues from stage `start`'s input (a shallower cached prefix). Fully frozen,
        the parameter-free pooling belongs to the prefix too: 1280 values an image instead of 62720."""
        with torch.no_grad():
            for stage in self.stages[start : self.freeze_depth]:
                x = stage(x)
            return self.pool(x) if self.fully_frozen else x

    def trainable_forward(self, features: torch.Tensor) -> torch.Tensor:
        x = features
        for stage in self.stages[self.freeze_depth :]:
            x = stage(x)
        return self.head(x if self.fully_frozen else self.pool(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.trainable_forward(self.frozen_features(x))

    def param_groups(self, lr: float, head_lr_mult: float, weight_decay: float = 0.0) -> list[dict]:
        backbone = [p for p in self.stages.parameters() if p.requires_grad]
        groups = [{"name": "head", "params": list(self.head.parameters()), "lr": lr * head_lr_mult}]
        if backbone:
            groups.insert(0, {"name": "backbone", "params": backbone, "lr": lr})
        for g in groups:
            g["weight_decay"] = weight_decay
        return groups


def build_model(
    backbone_name: str, num_classes: int, weights: Path | None, freeze_depth: int = 0
) -> FineTuneNet:
    """`weights=None` means random initialisation; callers only pass it for --no-pretrained."""
    backbone = BACKBONES.get(backbone_name)
    net = backbone.build()
    if weights is not None:
        load_pretrained(backbone, net, weights)
    stages, width = backbone.split(net)
    return FineTuneNet(stages, width, num_classes).freeze(freeze_depth)
