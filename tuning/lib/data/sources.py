"""The datasets by name (the registry), each a source that lists itself, and `folder:PATH` for
the user's own folder."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from tuning.lib.data import mnist
from tuning.lib.data.fetch import locate
from tuning.lib.data.listing import Item, Listing, list_flat, list_folders, split_items, take_subset
from tuning.lib.errors import UsageError
from tuning.lib.registry import Registry


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

    def check(self) -> None:
        if not self.path.is_dir():
            raise UsageError(f"folder {self.path} not found")

    def list(self, root: Path | None = None, *, seed: int = 0, per_class: int | None = None) -> "Listing":
        self.check()
        if (self.path / "train").is_dir():
            splits = tuple(s for s in ("train", "val", "test") if (self.path / s).is_dir())
            holdout = None if "val" in splits else 0.2
            return list_folders(self.path, splits, per_class, seed, holdout)
        return list_flat(self.path, (0.6, 0.2, 0.2), per_class, seed)


@dataclass(frozen=True)
class MnistSource:
    """torchvision's layout, `<root>/MNIST/raw/*-idx?-ubyte[.gz]`, downloaded through torchvision
    when absent (tuning.lib.data.mnist). Val is a stratified, seeded `holdout` of the official train; test
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


def parse_folder(spec: str) -> Path | None:
    """The absolute path in a `folder:PATH` spec, or None if `spec` names no folder. The one place
    that parses the prefix: the experiment, the source and the CLI all ask here."""
    if not spec.startswith(FOLDER_PREFIX):
        return None
    given = spec[len(FOLDER_PREFIX):]
    if not given:
        raise UsageError(f"{FOLDER_PREFIX} needs a path, e.g. {FOLDER_PREFIX}/data/my_images")
    return Path(given).expanduser().resolve()


def check_folder(spec: str) -> None:
    """Raises UsageError if `spec` is `folder:PATH` and PATH is no folder; the CLI asks this before
    its slow imports. Other specs pass: they are checked when listed."""
    folder = parse_folder(spec)
    if folder is not None:
        UserFolder(folder).check()


def create_source(name: str) -> Source:
    """A registered dataset by name, or `folder:PATH` for the user's own folder."""
    folder = parse_folder(name)
    if folder is not None:
        return UserFolder(folder)
    return DATASETS.get(name)
