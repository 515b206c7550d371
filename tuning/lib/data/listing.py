"""What a dataset holds, found without decoding a pixel: classes, splits (seeded, stratified) and
items. The decoded store is keyed by a listing, so a second run never decodes again."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

from tuning.lib.errors import UsageError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}


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
