"""Decoding: one image file to uint8 pixels at the decode size, and a whole listing to splits."""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from tuning.lib.data.listing import Item, Listing
from tuning.lib.errors import UsageError, warn

if TYPE_CHECKING:
    from tuning.lib.data.sources import Source


class UndecodableImage(Exception):
    pass


DECODE_ERRORS = (UndecodableImage, UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError)


SIXTEEN_BIT = ("I;16", "I;16L", "I;16B", "I;16N")  # how Pillow opens 16-bit grayscale PNGs and TIFFs


def eight_bit(img: Image.Image) -> Image.Image:
    """A 16-bit grayscale image as 8-bit, 65535 -> 255: Pillow's own conversion clips at 255, which
    turns such an image (microscopy, scans, depth maps) all but white."""
    if img.mode not in SIXTEEN_BIT:
        return img
    return Image.fromarray(np.round(np.asarray(img, dtype=np.float32) / 257.0).astype(np.uint8), "L")


ORIENTATION = 0x0112  # the EXIF tag


def upright(img: Image.Image) -> Image.Image:
    """As a photo viewer shows it: phones store a portrait photo sideways with an EXIF Orientation
    tag, and the user labels what the viewer showed. A tag that cannot be read leaves the pixels
    as stored, never the image unread."""
    try:
        if img.getexif().get(ORIENTATION, 1) == 1:
            return img
        return ImageOps.exif_transpose(img)
    except Exception:  # noqa: BLE001 - EXIF parsing fails in many ways; the pixels are still good
        return img


def prepare(opened: Image.Image, resize: int, mode: str = "RGB", name: str = "") -> np.ndarray:
    """uint8 HWC (C = 3 for "RGB", 1 for "L"), shorter side `resize`. GIFs, palettes, alpha and
    16-bit grayscale become plain 8-bit, turned upright as its EXIF says. Takes the image as opened
    (lazily) so decoding errors surface here."""
    try:
        with opened as img:
            img = upright(eight_bit(img)).convert(mode)
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


@dataclass
class Split:
    """Decoded images (uint8 HWC, shorter side = resize) and their labels."""

    images: Sequence[np.ndarray]
    labels: np.ndarray
    paths: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    classes: list[str]
    splits: dict[str, Split]


def decode_listing(listing: Listing, resize: int, mode: str = "RGB") -> Dataset:
    """Decode every item once; unreadable files are skipped with one warning, but a class left
    without a readable image in some split is the user's error, naming its folder."""
    splits: dict[str, Split] = {}
    unreadable: list[str] = []

    def one(item: Item) -> np.ndarray | None:
        try:
            return prepare(listing.reader(item.ref), resize, mode, item.ref)
        except DECODE_ERRORS:
            return None

    # Pillow releases the GIL while it decodes and resizes: threads use every core, in order
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        decoded = {name: list(pool.map(one, items)) for name, items in listing.splits.items()}
    for name, items in listing.splits.items():
        images, labels, paths = [], [], []
        for item, image in zip(items, decoded[name]):
            if image is None:
                unreadable.append(item.ref)
                continue
            images.append(image)
            labels.append(item.label)
            paths.append(item.ref)
        split = Split(images, np.asarray(labels, dtype=np.int64), paths)
        for label in range(len(listing.classes)):
            if not np.any(split.labels == label):
                raise UsageError(f"class folder {listing.origins[name][label]} holds no readable image")
        splits[name] = split
    if unreadable:
        warn(f"skipped {len(unreadable)} unreadable image(s): {', '.join(unreadable)}")
    return Dataset(listing.classes, splits)


def load(
    source: "Source", root: Path, resize: int, per_class: int | None = None, seed: int = 0, mode: str = "RGB"
) -> Dataset:
    """List and decode in one go, without the on-disk store (tests, benchmarks)."""
    return decode_listing(source.list(root, seed=seed, per_class=per_class), resize, mode)
