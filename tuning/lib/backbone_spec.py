"""What a backbone is (the registry's entries, tuning.lib.backbones; timm's, tuning.lib.timm_backbones)
and where torch hub weights come from: shared by both without either importing the other."""
from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from tuning.lib.errors import UsageError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Backbone:
    build: Callable[[], nn.Module]  # the ImageNet network, random weights, 1000 classes
    split: Callable[[nn.Module], tuple[list[nn.Module], int]]  # stages and feature width
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    first_conv: Callable[[nn.Module], nn.Conv2d]  # the convolution that sees the input's channels
    default_weights: Callable[[], Path]  # the file of ImageNet weights; UsageError if unobtainable
    adapt_state_dict: Callable[[dict, nn.Module], dict] = lambda sd, net: sd

    @functools.cached_property
    def num_stages(self) -> int:
        """The unit of freeze_depth, counted from `split` itself (a network is built once for it)."""
        return len(self.split(self.build())[0])


def hub_weights(url: str) -> Callable[[], Path]:
    def resolve() -> Path:
        cached = Path(torch.hub.get_dir()) / "checkpoints" / Path(url).name
        if cached.is_file():
            return cached
        cached.parent.mkdir(parents=True, exist_ok=True)
        try:
            # the file name carries a sha256 prefix; torch checks it
            prefix = Path(url).stem.split("-")[-1]
            torch.hub.download_url_to_file(url, str(cached), hash_prefix=prefix, progress=False)
        except Exception as err:  # URLError, hash mismatch, timeouts: all mean "no weights"
            cached.unlink(missing_ok=True)
            raise UsageError(
                f"no pretrained weights: {cached} is absent and downloading {url} failed ({err}); "
                "pass --weights FILE, copy the file there, or train from scratch with --no-pretrained"
            ) from None
        return cached

    return resolve
