"""The fine-tuning network: a staged pretrained backbone and a fresh linear head.

Stages are the unit of `freeze_depth`: the first k stages are frozen (no gradients, BatchNorm in
eval mode, run under no_grad), the rest and the head train. The head trains at lr x head_lr_mult.

One-channel images (MNIST) need a network that takes one channel. `gray_input` says how:
- "sum" (default): the first convolution's RGB kernels are summed into one. On a gray image
  (R = G = B) it computes what the pretrained RGB convolution computes, so the pretrained filters are
  kept (seed 001 replaced the layer with a random one and threw them away); it costs nothing, and
  the decoded images stay one channel, a third of the memory.
- "repeat": the gray channel is repeated three times in front of the unchanged network (seed 000's
  `x.expand(3, -1, -1)`): the same function at initialisation, three times the first layer's work.
"""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from tuning.lib.backbones import BACKBONES, load_pretrained

GRAY_INPUTS = ("sum", "repeat")


class FineTuneNet(nn.Module):
    def __init__(self, stages: list[nn.Module], num_features: int, num_classes: int) -> None:
        super().__init__()
        self.stages = nn.ModuleList(stages)
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(num_features, num_classes)
        nn.init.xavier_uniform_(self.head.weight)  # as seed 004
        nn.init.zeros_(self.head.bias)
        self.freeze_depth = 0
        self.in_repeat = 1  # 3: a one-channel input is repeated to RGB (gray_input "repeat")
        self.memory_format = torch.contiguous_format

    def channels_last(self) -> "FineTuneNet":
        self.memory_format = torch.channels_last
        return self.to(memory_format=torch.channels_last)

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=self.memory_format) if x.dim() == 4 else x

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
        """The frozen prefix's output: what tuning.lib.features caches and shares between trials.
        `start` > 0 continues from stage `start`'s input (a shallower cached prefix). Fully frozen,
        the parameter-free pooling belongs to the prefix too: 1280 values an image instead of 62720."""
        return self.frozen_features_keeping(x, start)[0]

    def frozen_features_keeping(
        self, x: torch.Tensor, start: int = 0, keep: tuple[int, ...] = ()
    ) -> tuple[torch.Tensor, dict[int, torch.Tensor]]:
        """`frozen_features`, and on the way the output at each shallower depth in `keep`: what a
        model frozen that deep would compute, by the very same operations."""
        if start == 0 and self.in_repeat > 1:
            x = x.expand(-1, self.in_repeat, -1, -1)
        x = self._layout(x)
        kept = {}
        with torch.no_grad():
            for depth, stage in enumerate(self.stages[start : self.freeze_depth], start + 1):
                x = stage(x)
                if depth in keep and depth < len(self.stages):
                    kept[depth] = x
            return (self.pool(x) if self.fully_frozen else x), kept

    def trainable_forward(self, features: torch.Tensor) -> torch.Tensor:
        x = self._layout(features)
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
    backbone_name: str, num_classes: int, weights: Path | None, freeze_depth: int = 0,
    *, image_mode: str = "RGB", gray_input: str = "sum", channels_last: bool = True,
) -> FineTuneNet:
    """`weights=None` means random initialisation; callers only pass it for --no-pretrained (and
    the export, which loads its own state dict). `image_mode` "L" takes one-channel input, adapted
    as `gray_input` says (see above). `channels_last=False` keeps PyTorch's default NCHW layout
    (the seeds' loop in benchmarks/)."""
    if image_mode not in ("RGB", "L"):
        raise ValueError(f"image_mode {image_mode!r} is neither 'RGB' nor 'L'")
    if gray_input not in GRAY_INPUTS:
        raise ValueError(f"gray_input {gray_input!r} is not one of {', '.join(GRAY_INPUTS)}")
    backbone = BACKBONES.get(backbone_name)
    net = backbone.build()
    if weights is not None:
        load_pretrained(backbone, net, weights)
    if image_mode == "L" and gray_input == "sum":
        sum_rgb_kernels(backbone.first_conv(net))
    stages, width = backbone.split(net)
    model = FineTuneNet(stages, width, num_classes)
    if image_mode == "L" and gray_input == "repeat":
        model.in_repeat = 3
    model.freeze(freeze_depth)
    return model.channels_last() if channels_last else model


def sum_rgb_kernels(conv: nn.Conv2d) -> None:
    """Make `conv` take one channel, its kernel the sum of the RGB kernels, in place (so timm's
    TF-"same"-padding convolution keeps its padding)."""
    conv.weight = nn.Parameter(conv.weight.detach().sum(1, keepdim=True))
    conv.in_channels = 1
