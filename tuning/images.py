"""Decoding and the seeds' transforms, on tensors.

Every image is decoded once and resized so its shorter side is `resize` (256 for 224 crops, as the
seeds' eval Resize(256)). Training crops (RandomResizedCrop + flip) and eval crops (CenterCrop) are
taken from that decoded copy, so trials never touch a JPEG again, and the exported model's
preprocessing (`eval_tensor`) is the very code the trial was validated with.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

# Decoded images are shared read-only through Ray's object store; nothing here writes to them.
warnings.filterwarnings("ignore", message="The given NumPy array is not writable")

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


class UndecodableImage(Exception):
    pass


DECODE_ERRORS = (UndecodableImage, UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


def resize_for(image_size: int) -> int:
    """The seeds resize to 256 before a 224 crop; keep that ratio at other sizes."""
    return round(image_size * 256 / 224)


def prepare(opened: Image.Image, resize: int, mode: str = "RGB", name: str = "") -> np.ndarray:
    """uint8 HWC (C = 3 for "RGB", 1 for "L"), shorter side `resize`. GIFs, palettes and alpha
    become plain RGB. Takes the image as opened (lazily) so decoding errors surface here."""
    try:
        with opened as img:
            img = img.convert(mode)
    except DECODE_ERRORS as err:
        raise UndecodableImage(f"{name}: {err}") from err
    w, h = img.size
    scale = resize / min(w, h)
    size = (max(resize, round(w * scale)), max(resize, round(h * scale)))
    array = np.asarray(img.resize(size, Image.BILINEAR), dtype=np.uint8)
    return array if array.ndim == 3 else array[:, :, None]


def decode(path: Path | str, resize: int, mode: str = "RGB") -> np.ndarray:
    try:
        opened = Image.open(path)
    except DECODE_ERRORS as err:
        raise UndecodableImage(f"{path}: {err}") from err
    return prepare(opened, resize, mode, str(path))


def center_crop(array: np.ndarray, size: int) -> torch.Tensor:
    """uint8 CHW crop of an HWC image, as torchvision's CenterCrop."""
    h, w = array.shape[:2]
    top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
    crop = array[top : top + size, left : left + size]
    return torch.from_numpy(np.ascontiguousarray(crop)).permute(2, 0, 1)


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


class TrainAugment:
    """RandomResizedCrop + horizontal flip, as every seed does, on decoded uint8 images."""

    def __init__(self, size: int) -> None:
        self.transform = v2.Compose(
            [v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()]
        )

    def __call__(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        return torch.stack(
            [self.transform(torch.from_numpy(a).permute(2, 0, 1)) for a in arrays]
        )


def eval_tensor(path: Path | str, image_size: int, norm: Normalize) -> torch.Tensor:
    """One image, preprocessed exactly as validation images are: for prediction."""
    array = decode(path, resize_for(image_size))
    return norm(center_crop(array, image_size).unsqueeze(0))
