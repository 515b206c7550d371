"""Our state dict under the backbone library's own key names, so an export loads into a plain
`timm.create_model(...)` or `torchvision.models.resnetXX(...)` with strict=True, no `tuning` needed.

FineTuneNet holds the backbone's own modules, regrouped as stages (`stages.1.0.conv_dw.weight` is
timm's `blocks.0.0.conv_dw.weight`); the head is the library's classifier (`classifier`, `fc`).
The key map is found, not written down: a fresh network is split as the backbone splits it, and
each tensor of the FineTuneNet built on it is the network's own tensor under another name."""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from tuning.lib.backbones import BACKBONES
from tuning.lib.model import FineTuneNet


def key_map(backbone_name: str) -> dict[str, str]:
    """FineTuneNet key -> the library network's key."""
    backbone = BACKBONES.get(backbone_name)
    net = backbone.build()
    theirs = net.state_dict(keep_vars=True)  # before the split: timm's split drops the classifier
    stages, width = backbone.split(net)
    ours = FineTuneNet(stages, width, 2).state_dict(keep_vars=True)
    name_of = {id(t): name for name, t in theirs.items()}
    mapping = {key: name_of[id(t)] for key, t in ours.items() if id(t) in name_of}
    left = sorted(set(theirs) - set(mapping.values()))
    classifier = {name.rsplit(".", 1)[0] for name in left}
    if len(classifier) != 1 or sorted(k.rsplit(".", 1)[1] for k in left) != ["bias", "weight"]:
        raise ValueError(f"{backbone_name}: cannot tell the classifier among {left}")
    prefix = classifier.pop()
    mapping.update({"head.weight": f"{prefix}.weight", "head.bias": f"{prefix}.bias"})
    if set(mapping) != set(ours):
        raise ValueError(f"{backbone_name}: no library key for {sorted(set(ours) - set(mapping))}")
    return mapping


def to_plain(state: dict[str, torch.Tensor], backbone_name: str) -> dict[str, torch.Tensor]:
    """`state` (a FineTuneNet state dict) under the library network's key names."""
    mapping = key_map(backbone_name)
    return {mapping[k]: v for k, v in state.items()}


def plain_constructor(meta: dict[str, Any]) -> str:
    """The one line that builds the network `to_plain`'s state dict loads into, for model.json."""
    backbone = BACKBONES.get(meta["backbone"])
    net: nn.Module = backbone.build()
    k = len(meta["classes"])
    one_channel = meta.get("image_mode", "RGB") == "L" and meta.get("gray_input", "sum") == "sum"
    if type(net).__module__.startswith("timm"):
        arch = net.pretrained_cfg["architecture"]
        return f"net = timm.create_model({arch!r}, num_classes={k}{', in_chans=1' if one_channel else ''})"
    line = f"net = torchvision.models.{meta['backbone']}(num_classes={k})"
    if one_channel:  # torchvision has no in_chans: the first convolution takes one channel
        conv = backbone.first_conv(net)
        line += (f"; net.conv1 = torch.nn.Conv2d(1, {conv.out_channels}, {conv.kernel_size[0]}, "
                 f"{conv.stride[0]}, {conv.padding[0]}, bias=False)")
    return line
