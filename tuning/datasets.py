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
from typing import Callable, Protocol, Sequence

import numpy as np
from PIL import Image

from tuning import mnist
from tuning.errors import UsageError
from tuning.images import DECODE_ERRORS, IMAGE_SUFFIXES, prepare
from tuning.registry import Registry

DATA_ROOT_ENV = "TUNING_DATA_ROOT"


def resolve_data_root(arg: str | None) -> Path:
    return Path(arg or os.environ.get(DATA_ROOT_ENV) or "data").expanduser()


def locate(root: Path, dirname: str, url: str | None = None, sha1: str | None = None) -> Path:
    """`root/dirname`, downloaded and extracted there first when absent and there is a `url`."""
    base = root / dirname
    if base.is_dir():
        return base
    if url is None:
        raise UsageError(f"dataset folder {base} not found; put the data there or pass --data-root")
    try:
        download_zip(url, root, sha1)
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise UsageError(
            f"{base} not found and downloading {url} failed ({err}); "
            f"put the '{dirname}' folder under {root} (or pass --data-root / set {DATA_ROOT_ENV})"
        ) from None
    if not base.is_dir():
        raise UsageError(f"the archive from {url} holds no '{dirname}' folder")
    return base


@dataclass(frozen=True)
class FolderSource:
    """A dataset stored as `<root>/<dirname>/<split>/<class>/<image>` (torchvision's ImageFolder).
    Without a val folder, `holdout` is the stratified, seeded share of train held out as val."""

    dirname: str
    splits: tuple[str, ...] = ("train", "val")
    url: str | None = None
    sha1: str | None = None
    holdout: float | None = None

    def locate(self, root: Path) -> Path:
        return locate(root, self.dirname, self.url, self.sha1)

    def list(self, root: Path, *, seed: int = 0, per_class: int | None = None) -> "Listing":
        return list_folders(self.locate(root), self.splits, per_class, seed, self.holdout)


@dataclass(frozen=True)
class FlatFolderSource:
    """A dataset stored as `<root>/<dirname>/<class>/<image>`, split per class, seeded, into
    train/val/test by `fractions` (the Pokemon seed's 60/20/20)."""

    dirname: str
    fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)

    def list(self, root: Path, *, seed: int = 0, per_class: int | None = None) -> "Listing":
        return list_flat(locate(root, self.dirname), self.fractions, per_class, seed)


@dataclass(frozen=True)
class UserFolder:
    """`folder:PATH`: the user's own folder, as given (not under the data root). With a `train`
    folder it is `{train,val[,test]}/CLASS/*` (no val: 20 % of train held out); else flat
    `CLASS/*`, split 60/20/20 like pokemon."""

    path: Path

    def list(self, root: Path | None = None, *, seed: int = 0, per_class: int | None = None) -> "Listing":
        if not self.path.is_dir():
            raise UsageError(f"folder {self.path} not found")
        if (self.path / "train").is_dir():
            splits = tuple(s for s in ("train", "val", "test") if (self.path / s).is_dir())
            holdout = None if "val" in splits else 0.2
            return list_folders(self.path, splits, per_class, seed, holdout)
        return list_flat(self.path, (0.6, 0.2, 0.2), per_class, seed)


@dataclass(frozen=True)
class MnistSource:
    """torchvision's layout, `<root>/MNIST/raw/*-idx?-ubyte[.gz]`, downloaded through torchvision
    when absent (tuning.mnist). Val is a stratified, seeded `holdout` of the official train; test
    is the official test set. Items are "train:123"; the reader opens them from cached arrays."""

    dirname: str = "MNIST"
    holdout: float = 0.1

    def list(self, root: Path, *, seed: int = 0, per_class: int | None = None) -> "Listing":
        files = mnist.locate(root / self.dirname)
        found: dict[str, list[Item]] = {}
        for split, (images, labels) in files.items():
            try:
                y, x = mnist.read_idx(str(labels)), mnist.read_idx(str(images))
            except (OSError, ValueError, EOFError) as err:
                raise UsageError(f"cannot read MNIST from {images.parent}: {err}") from None
            if len(y) != len(x) or x.ndim != 3 or y.ndim != 1 or (len(y) and y.max() > 9):
                raise UsageError(f"{images} and {labels} are not an MNIST pair ({x.shape} images, {y.shape} labels)")
            found[split] = [Item(f"{split}:{i}", int(label)) for i, label in enumerate(y)]
        classes = [str(d) for d in range(10)]
        origins = {split: [f"{files[split][0]} (digit {d})" for d in classes] for split in files}
        held = split_items(found["train"], {"train": 1 - self.holdout, "val": self.holdout}, seed, origins["train"])
        splits = {name: take_subset(items, per_class) for name, items in [*held.items(), ("test", found["test"])]}
        content = [p for pair in files.values() for p in pair]
        reader = mnist.IdxReader(tuple((split, str(pair[0])) for split, pair in files.items()))
        return Listing(classes, splits, content, {**origins, "val": origins["train"]}, reader)


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


def split_items(
    items: list[Item], fractions: dict[str, float], seed: int, origins: list[str]
) -> dict[str, list[Item]]:
    """Split each class's items by `fractions` (the first split takes what the others leave),
    shuffled by a numpy Generator seeded with (seed, label): the same seed gives the same splits,
    and each class's split does not depend on the other classes. Items keep their listed order."""
    names = list(fractions)
    assignment: dict[int, str] = {}
    for label in sorted({item.label for item in items}):
        members = [i for i, item in enumerate(items) if item.label == label]
        if len(members) < len(names):
            raise UsageError(f"class folder {origins[label]} has {len(members)} image(s); "
                             f"splitting into {'/'.join(names)} needs at least {len(names)}")
        order = np.random.default_rng([seed, label]).permutation(len(members))
        start = 0
        counts = {n: max(1, round(fractions[n] * len(members))) for n in names[1:]}
        counts[names[0]] = len(members) - sum(counts.values())
        for name in [*names[1:], names[0]]:
            for k in order[start : start + counts[name]]:
                assignment[members[k]] = name
            start += counts[name]
    return {name: [item for i, item in enumerate(items) if assignment[i] == name] for name in names}


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


def check_classes(base: Path, classes: list[str]) -> None:
    if len(classes) < 2:
        raise UsageError(f"{base} has {len(classes)} class; a classifier needs at least two")


def list_folders(
    base: Path, split_names: tuple[str, ...], per_class: int | None = None, seed: int = 0,
    holdout: float | None = None,
) -> Listing:
    classes: list[str] | None = None
    found: dict[str, list[Item]] = {}
    origins: dict[str, list[str]] = {}
    for name in split_names:
        classes, found[name], origins[name] = scan_split(base / name, classes)
    assert classes is not None
    check_classes(base, classes)
    if holdout is not None:  # no val folder: val is a stratified, seeded part of train
        held = split_items(found.pop("train"), {"train": 1 - holdout, "val": holdout}, seed, origins["train"])
        found = {**held, **found}
        origins["val"] = origins["train"]
    splits = {name: take_subset(found[name], per_class) for name in ("train", "val", "test") if name in found}
    content = [Path(item.ref) for items in splits.values() for item in items]
    return Listing(classes, splits, content, {name: origins[name] for name in splits})


def list_flat(
    base: Path, fractions: tuple[float, float, float], per_class: int | None = None, seed: int = 0
) -> Listing:
    """`base/CLASS/*` split into train/val/test; `per_class` applies after splitting, so a smaller
    subset never moves an image to another split."""
    classes, items, folders = scan_split(base)
    check_classes(base, classes)
    found = split_items(items, dict(zip(("train", "val", "test"), fractions)), seed, folders)
    splits = {name: take_subset(part, per_class) for name, part in found.items()}
    content = [Path(item.ref) for part in splits.values() for item in part]
    return Listing(classes, splits, content, {name: folders for name in splits})


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


class Source(Protocol):
    def list(self, root: Path, *, seed: int = 0, per_class: int | None = None) -> Listing: ...


DATASETS: Registry[Source] = Registry("dataset")
DATASETS.add(
    "hymenoptera",
    FolderSource("hymenoptera_data", url="https://download.pytorch.org/tutorial/hymenoptera_data.zip"),
)
# d2l's hotdog/{train,test}/{hotdog,not-hotdog}: no val folder, so a fifth of train is held out.
DATASETS.add(
    "hotdog",
    FolderSource("hotdog", splits=("train", "test"), url="http://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip",
                 sha1="fba480ffa8aa7e0febbb511d181409f899b9baa5", holdout=0.2),
)
DATASETS.add("pokemon", FlatFolderSource("pokemon"))  # no public download: the data root only
DATASETS.add("mnist", MnistSource())

FOLDER_PREFIX = "folder:"


def create_source(name: str) -> Source:
    """A registered dataset by name, or `folder:PATH` for the user's own folder."""
    if name.startswith(FOLDER_PREFIX):
        path = name[len(FOLDER_PREFIX):]
        if not path:
            raise UsageError(f"{FOLDER_PREFIX} needs a path, e.g. {FOLDER_PREFIX}/data/my_images")
        return UserFolder(Path(path).expanduser())
    return DATASETS.get(name)


def load(
    source: Source, root: Path, resize: int, per_class: int | None = None, seed: int = 0, mode: str = "RGB"
) -> Dataset:
    """List and decode in one go, without the on-disk store (tests, benchmarks)."""
    return decode_listing(source.list(root, seed=seed, per_class=per_class), resize, mode)
