"""Any timm model as a backbone: `timm:NAME` (`timm:convnext_atto`, `timm:resnet50.a1_in1k`).

Stages are cut where timm's own `feature_info` says a network's feature levels end, so freeze
depth, the frozen-feature cache and the memory probe treat a timm model as they treat the named
backbones. The classifier is removed with timm's `reset_classifier(0, "")`, which also turns its
pooling off; whatever else the head held (ConvNeXt's norm) stays in the last stage and so runs on
the feature map before our pooling rather than after it: the pretrained values are kept, applied
per position.

Weights: `--weights FILE`, else the Hugging Face / timm cache, else a download when online. With
HF_HUB_OFFLINE=1 (or no network) and nothing cached the search stops with one line; it never falls
back to random weights."""
from __future__ import annotations

import os
import socket
from pathlib import Path
from urllib.parse import urlparse

import timm
import torch
from torch import nn

from tuning.lib.backbone_spec import Backbone, hub_weights
from tuning.lib.errors import UsageError

PREFIX = "timm:"
# the files timm publishes on the Hugging Face hub, safest first (as timm's own loader tries them)
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


def backbone(name: str) -> Backbone:
    """The registry's maker for `timm:NAME`: checks the name and that the network can be staged."""
    if not timm.is_model(name):
        close = timm.list_models(f"*{name.split('.')[0]}*")[:5]
        hint = f"; close: {', '.join(close)}" if close else "; see timm.list_models()"
        raise UsageError(f"unknown timm model {name!r}{hint}")
    cfg = timm.create_model(name, pretrained=False).pretrained_cfg
    spec = Backbone(
        build=lambda: timm.create_model(name, pretrained=False),
        split=split,
        mean=tuple(cfg.get("mean", (0.485, 0.456, 0.406))),
        std=tuple(cfg.get("std", (0.229, 0.224, 0.225))),
        first_conv=lambda net: _first_conv(net, cfg.get("first_conv")),
        default_weights=lambda: cached_weights(name, cfg),
    )
    check_stages(name, spec)
    return spec


def split(net: nn.Module) -> tuple[list[nn.Module], int]:
    """One stage per feature level of timm's `feature_info`, in the order forward_features runs
    the children (the top-level Sequentials flattened, as timm's FeatureListNet does)."""
    ends = [info["module"] for info in net.feature_info]
    net.reset_classifier(0, "")
    stages: list[nn.Module] = []
    current: list[nn.Module] = []
    for name, child in _children(net):
        current.append(child)
        if name in ends:
            stages.append(nn.Sequential(*current))
            current = []
    if current and stages:  # what follows the last level (EfficientNet's conv_head, bn2): last stage
        stages[-1] = nn.Sequential(*stages[-1], *current)
    return stages, net.num_features


def _children(net: nn.Module) -> list[tuple[str, nn.Module]]:
    out = []
    for name, child in net.named_children():
        if isinstance(child, nn.Sequential) and any(f"{name}." in info["module"] for info in net.feature_info):
            out.extend((f"{name}.{sub}", module) for sub, module in child.named_children())
        else:
            out.append((name, child))
    return out


def check_stages(name: str, spec: Backbone) -> None:
    """A network whose levels are not image-shaped (a ViT's tokens) cannot be staged this way."""
    net = spec.build().eval()
    stages, width = spec.split(net)
    x = torch.zeros(1, 3, 64, 64)
    try:
        with torch.no_grad():
            for stage in stages:
                x = stage(x)
    except Exception as err:  # noqa: BLE001 - any failure means: not stageable
        raise UsageError(f"timm model {name!r} cannot be cut into stages by its feature_info ({type(err).__name__})") from None
    if len(stages) < 2 or x.dim() != 4 or x.shape[1] != width:
        raise UsageError(f"timm model {name!r} does not end in an image-shaped feature map of "
                         f"{width} channels (got {tuple(x.shape)}); pick a convolutional model")


def _first_conv(net: nn.Module, path: str | None) -> nn.Conv2d:
    conv = net.get_submodule(path) if path else None
    if not isinstance(conv, nn.Conv2d):
        raise UsageError(f"cannot find the first convolution of this timm model ({path!r}); gray input needs it")
    return conv


def cached_weights(name: str, cfg: dict) -> Path:
    """The pretrained file from the Hugging Face cache, or downloaded unless offline."""
    repo = cfg.get("hf_hub_id")
    if repo:
        return _hub_file(name, repo)
    url = cfg.get("url")
    if url:
        return hub_weights(url)()
    raise UsageError(f"timm model {name!r} has no published pretrained weights; pass --weights FILE or --no-pretrained")


def _check_reachable(what: str, advice: str) -> None:
    """One quick connection instead of huggingface_hub's minute of retries when there is no network
    (behind a proxy the proxy decides, so no probe)."""
    if any(os.environ.get(v) for v in ("HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy")):
        return
    from huggingface_hub import constants

    host = urlparse(constants.ENDPOINT).hostname or "huggingface.co"
    try:
        socket.create_connection((host, 443), timeout=5).close()
    except OSError as err:
        raise UsageError(f"{what} {host} cannot be reached ({err.strerror or type(err).__name__}); {advice}") from None


def _hub_file(name: str, repo: str) -> Path:
    from huggingface_hub import hf_hub_download

    for filename in HUB_FILES:  # the cache first, without touching the network
        try:
            return Path(hf_hub_download(repo, filename, local_files_only=True))
        except Exception:  # noqa: BLE001 - not cached under this name
            continue
    advice = f"pass --weights FILE, fill the Hugging Face cache with {repo}, or train from scratch with --no-pretrained"
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes", "on"):
        raise UsageError(f"no pretrained weights for timm:{name}: {repo} is not in the Hugging Face cache and HF_HUB_OFFLINE is set; {advice}")
    _check_reachable(f"no pretrained weights for timm:{name}: {repo} is not cached and", advice)
    errors = []
    for filename in HUB_FILES:
        try:
            return Path(hf_hub_download(repo, filename, etag_timeout=10))
        except Exception as err:  # noqa: BLE001 - offline, missing file, hub error: all mean "no weights"
            errors.append(f"{filename}: {type(err).__name__}")
    raise UsageError(f"no pretrained weights for timm:{name}: {repo} is not cached and the download failed "
                     f"({'; '.join(errors)}); {advice}")
