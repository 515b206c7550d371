"""Where datasets live on disk, how to fetch them, and reading them into decoded splits.

The driver decodes every image once (`load`) and hands the decoded arrays to all trials through
Ray's object store, so no trial decodes a JPEG.
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

import numpy as np

from tuning.errors import UsageError
from tuning.images import IMAGE_SUFFIXES, UndecodableImage, decode
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


@dataclass
class Split:
    """Decoded images (uint8 HWC, shorter side = resize) and their labels."""

    images: list[np.ndarray]
    labels: np.ndarray
    paths: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.labels)


@dataclass
class Dataset:
    classes: list[str]
    splits: dict[str, Split]


def scan_split(folder: Path, classes: list[str] | None = None) -> tuple[list[str], list[tuple[Path, int]]]:
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
        items += [(p, label) for p in files]
    return found, items


def take_subset(items: list[tuple[Path, int]], per_class: int | None) -> list[tuple[Path, int]]:
    if per_class is None:
        return items
    counts: dict[int, int] = {}
    kept = []
    for path, label in items:
        if counts.get(label, 0) < per_class:
            counts[label] = counts.get(label, 0) + 1
            kept.append((path, label))
    return kept


def decode_split(items: list[tuple[Path, int]], resize: int) -> tuple[Split, list[str]]:
    images, labels, paths, bad = [], [], [], []
    for path, label in items:
        try:
            images.append(decode(path, resize))
        except UndecodableImage:
            bad.append(str(path))
            continue
        labels.append(label)
        paths.append(str(path))
    return Split(images, np.asarray(labels, dtype=np.int64), paths), bad


def load(source: FolderSource, root: Path, resize: int, per_class: int | None = None) -> Dataset:
    base = source.locate(root)
    classes: list[str] | None = None
    splits: dict[str, Split] = {}
    unreadable: list[str] = []
    for name in source.splits:
        classes, items = scan_split(base / name, classes)
        split, bad = decode_split(take_subset(items, per_class), resize)
        unreadable += bad
        splits[name] = split
        for label, cls in enumerate(classes):
            if not np.any(split.labels == label):
                raise UsageError(f"class folder {base / name / cls} holds no readable image")
    assert classes is not None
    if len(classes) < 2:
        raise UsageError(f"{base} has {len(classes)} class; a classifier needs at least two")
    if unreadable:
        print(f"warning: skipped {len(unreadable)} unreadable image(s): {', '.join(unreadable)}", file=sys.stderr)
    return Dataset(classes, splits)
