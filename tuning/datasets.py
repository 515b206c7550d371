"""Where datasets live on disk, how to fetch them, and reading them into decoded splits.

A source `list`s what a dataset holds (classes, splits, items) without decoding; `decode_listing`
decodes it. `tuning.store` sits between the two so that decoding happens once per content and size.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import sys
import tempfile
import urllib.request
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
from PIL import Image

from tuning.errors import UsageError
from tuning.images import DECODE_ERRORS, IMAGE_SUFFIXES, prepare
from tuning.registry import Registry

DATA_ROOT_ENV = "TUNING_DATA_ROOT"


def resolve_data_root(arg: str | None) -> Path:
    return Path(arg or os.environ.get(DATA_ROOT_ENV) or "data").expanduser()


@dataclass(frozen=True)
class FolderSource:
    """A dataset stored as `<root>/<dirname>/<split>/<class>/<image>` (torchvision's ImageFolder)."""

    dirname: str
    splits: tuple[str, ...] = ("train", "val")
    url: str | None = None
    sha1: str | None = None

    def locate(self, root: Path) -> Path:
        base = root / self.dirname
        if base.is_dir():
            return base
        if self.url is None:
            raise UsageError(f"dataset folder {base} not found; put the data there or pass --data-root")
        try:
            download_zip(self.url, root, self.sha1)
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise UsageError(
                f"{base} not found and downloading {self.url} failed ({err}); "
                f"put the '{self.dirname}' folder under {root} (or pass --data-root / set {DATA_ROOT_ENV})"
            ) from None
        if not base.is_dir():
            raise UsageError(f"the archive from {self.url} holds no '{self.dirname}' folder")
        return base

    def list(self, root: Path, *, seed: int = 0, per_class: int | None = None) -> "Listing":
        return list_folders(self, root, per_class)


DATASETS: Registry[FolderSource] = Registry("dataset")
DATASETS.add(
    "hymenoptera",
    FolderSource("hymenoptera_data", url="https://download.pytorch.org/tutorial/hymenoptera_data.zip"),
)


def download_zip(url: str, root: Path, sha1: str | None, timeout: float = 30.0) -> None:
    """Download to a temporary file, check it, then extract: a failed fetch leaves nothing behind."""
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root) as tmp:
        archive = Path(tmp) / "archive.zip"
        print(f"downloading {url} ...", file=sys.stderr)
        with urllib.request.urlopen(url, timeout=timeout) as response, archive.open("wb") as out:
            shutil.copyfileobj(response, out)
        if sha1 is not None:
            digest = hashlib.sha1(archive.read_bytes()).hexdigest()
            if digest != sha1:
                raise ValueError(f"sha1 {digest} does not match the expected {sha1}")
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(root)


@dataclass(frozen=True)
class Item:
    """One labelled image before decoding: `ref` is a file path, or an id the listing's `reader`
    understands (an index into an idx file, say)."""

    ref: str
    label: int


def open_file(ref: str) -> Image.Image:
    return Image.open(ref)


@dataclass
class Listing:
    """What a dataset holds, found without decoding a pixel. The decoded store is keyed by it, so
    a second run (or a second trial) never decodes again."""

    classes: list[str]
    splits: dict[str, list[Item]]  # "train", "val", and "test" when the dataset has one
    content: list[Path]  # the files whose bytes define the data: hashed into the store's key
    origins: dict[str, list[str]]  # per split, per label: the folder named in messages
    reader: Callable[[str], Image.Image] = open_file


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


def scan_split(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[Item], list[str]]:
    if not folder.is_dir():
        raise UsageError(f"split folder {folder} not found")
    found = sorted(p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
    if classes is not None and found != classes:
        raise UsageError(f"{folder} has classes {found}, but train has {classes}")
    items = []
    for label, name in enumerate(found):
        files = sorted(
            p for p in (folder / name).rglob("*")
            if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith(".")
        )
        if not files:
            raise UsageError(f"class folder {folder / name} holds no images")
        items += [Item(str(p), label) for p in files]
    return found, items, [str(folder / name) for name in found]


def take_subset(items: list[Item], per_class: int | None) -> list[Item]:
    if per_class is None:
        return items
    counts: dict[int, int] = {}
    kept = []
    for item in items:
        if counts.get(item.label, 0) < per_class:
            counts[item.label] = counts.get(item.label, 0) + 1
            kept.append(item)
    return kept


def list_folders(source: FolderSource, root: Path, per_class: int | None = None) -> Listing:
    base = source.locate(root)
    classes: list[str] | None = None
    splits: dict[str, list[Item]] = {}
    origins: dict[str, list[str]] = {}
    for name in source.splits:
        classes, items, origins[name] = scan_split(base / name, classes)
        splits[name] = take_subset(items, per_class)
    assert classes is not None
    if len(classes) < 2:
        raise UsageError(f"{base} has {len(classes)} class; a classifier needs at least two")
    content = [Path(item.ref) for items in splits.values() for item in items]
    return Listing(classes, splits, content, origins)


def decode_listing(listing: Listing, resize: int, mode: str = "RGB") -> Dataset:
    """Decode every item once; unreadable files are skipped with one warning, but a class left
    without a readable image in some split is the user's error, naming its folder."""
    splits: dict[str, Split] = {}
    unreadable: list[str] = []
    for name, items in listing.splits.items():
        images, labels, paths = [], [], []
        for item in items:
            try:
                images.append(prepare(listing.reader(item.ref), resize, mode, item.ref))
            except DECODE_ERRORS:
                unreadable.append(item.ref)
                continue
            labels.append(item.label)
            paths.append(item.ref)
        split = Split(images, np.asarray(labels, dtype=np.int64), paths)
        for label in range(len(listing.classes)):
            if not np.any(split.labels == label):
                raise UsageError(f"class folder {listing.origins[name][label]} holds no readable image")
        splits[name] = split
    if unreadable:
        print(f"warning: skipped {len(unreadable)} unreadable image(s): {', '.join(unreadable)}", file=sys.stderr)
    return Dataset(listing.classes, splits)


def load(
    source: FolderSource, root: Path, resize: int, per_class: int | None = None, seed: int = 0, mode: str = "RGB"
) -> Dataset:
    """List and decode in one go, without the on-disk store (tests, benchmarks)."""
    return decode_listing(source.list(root, seed=seed, per_class=per_class), resize, mode)
