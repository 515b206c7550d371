"""The seeds' transforms, on decoded uint8 images: centre crops for evaluation, fixed random
resized crops and flips for training, and normalisation.

Images are decoded once, shorter side `resize_for(size)` (256 for 224 crops, as the seeds' eval
Resize(256)); crops are taken from that copy, so trials never touch a JPEG again, and the exported
model's preprocessing (`eval_tensor`) is the very code the trial was validated with.
"""
from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torchvision.transforms import v2

from tuning.lib.data.decode import decode


def resize_for(image_size: int) -> int:
    """The seeds resize to 256 before a 224 crop; keep that ratio at other sizes."""
    return round(image_size * 256 / 224)


def as_tensor(array: np.ndarray) -> torch.Tensor:
    """A tensor sharing the array's memory. Decoded images are read-only views of the memory-mapped
    store, and nothing here writes to them, so torch's warning about that is silenced here only."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def center_crop(array: np.ndarray, size: int) -> torch.Tensor:
    """uint8 CHW crop of an HWC image, as torchvision's CenterCrop."""
    h, w = array.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    crop = array[top : top + size, left : left + size]
    return as_tensor(np.ascontiguousarray(crop)).permute(2, 0, 1)


@dataclass(frozen=True)
class Normalize:
    mean: tuple[float, ...]  # one per input channel
    std: tuple[float, ...]

    @classmethod
    def for_mode(cls, mean: tuple[float, ...], std: tuple[float, ...], mode: str = "RGB") -> "Normalize":
        """The backbone's RGB statistics for images decoded in `mode`: as they are for "RGB"; for
        "L" (one channel) their averages, what a gray pixel replicated to R = G = B sees on average
        (exactly, for EfficientNet-Lite0's equal 0.5s)."""
        if mode == "RGB":
            return cls(tuple(mean), tuple(std))
        if mode == "L":
            return cls((sum(mean) / len(mean),), (sum(std) / len(std),))
        raise ValueError(f"image mode {mode!r} is neither 'RGB' nor 'L'")

    def __call__(self, batch_uint8: torch.Tensor) -> torch.Tensor:
        mean = torch.tensor(self.mean, device=batch_uint8.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=batch_uint8.device).view(1, -1, 1, 1)
        return (batch_uint8.float().div_(255.0) - mean) / std


def eval_batch(arrays: Sequence[np.ndarray], size: int) -> torch.Tensor:
    return torch.stack([center_crop(a, size) for a in arrays])


@dataclass(frozen=True)
class TrainViews:
    """The seeds' RandomResizedCrop + horizontal flip, with the randomness fixed by (seed, epoch,
    image): every trial sees the same view of image i in epoch e. Trials still differ in order and
    batching; what they share is the input, which is what lets trials at one freeze depth share the
    frozen stages' outputs (tuning.lib.features) and keeps a configuration's training reproducible."""

    size: int
    scale: tuple[float, float] = (0.08, 1.0)
    hflip: bool = True
    seed: int = 0
    ratio: tuple[float, float] = (3 / 4, 4 / 3)

    def view(self, image: np.ndarray, epoch: int, index: int) -> torch.Tensor:
        rng = np.random.default_rng([self.seed, epoch, index])
        top, left, h, w = crop_params(image.shape[0], image.shape[1], self.scale, self.ratio, rng)
        chw = as_tensor(image).permute(2, 0, 1)
        out = v2.functional.resized_crop(chw, top, left, h, w, [self.size, self.size], antialias=True)
        return out.flip(-1) if self.hflip and rng.random() < 0.5 else out

    def batch(self, images: Sequence[np.ndarray], indices: Sequence[int], epoch: int) -> torch.Tensor:
        return torch.stack([self.view(images[i], epoch, i) for i in indices])


def crop_params(
    height: int, width: int, scale: tuple[float, float], ratio: tuple[float, float], rng: np.random.Generator
) -> tuple[int, int, int, int]:
    """torchvision's RandomResizedCrop.get_params, drawing from `rng` instead of torch's global RNG."""
    area = height * width
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def eval_tensor(path: Path | str, image_size: int, norm: Normalize) -> torch.Tensor:
    """One image, preprocessed exactly as validation images are: for prediction."""
    array = decode(path, resize_for(image_size))
    return norm(center_crop(array, image_size).unsqueeze(0))
