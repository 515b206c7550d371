"""A predictor made from an export alone: the network, its classes and validation's preprocessing."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import torch

from tuning.app.export import load_exported
from tuning.lib.data.decode import DECODE_ERRORS, UndecodableImage, decode
from tuning.lib.data.listing import IMAGE_SUFFIXES
from tuning.lib.data.transforms import Normalize, center_crop
from tuning.lib.errors import UsageError
from tuning.lib.ensemble import Ensemble


@dataclass
class Predictor:
    model: Ensemble  # log-probabilities out (tuning.lib.ensemble)
    meta: dict[str, Any]
    norm: Normalize
    batch_size: int = 32  # images decoded and run together: memory stays bounded on any number

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    def read(self, path: str | Path) -> np.ndarray:
        """uint8 HWC at the export's decode size, as validation images were decoded; raises
        UndecodableImage."""
        return decode(path, self.meta["resize"], self.meta.get("image_mode", "RGB"))

    def decode(self, path: str | Path) -> np.ndarray:
        """As `read`; a file that is no image is the user's to fix (UsageError)."""
        try:
            return self.read(path)
        except UndecodableImage:
            raise UsageError(f"{path} is not a readable image") from None

    def crops(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 NCHW centre crops of decoded images: what the network, and model.onnx, take."""
        return torch.stack([center_crop(a, self.meta["image_size"]) for a in images])

    @torch.no_grad()
    def probabilities(self, images: Iterable[np.ndarray]) -> np.ndarray:
        """(N, classes) softmax probabilities of decoded images, batch by batch."""
        out = [self.model(self.norm(self.crops(batch))).softmax(1).numpy() for batch in chunks(images, self.batch_size)]
        return np.concatenate(out) if out else np.zeros((0, len(self.classes)), dtype=np.float32)

    def predict(self, paths: Iterable[str | Path]) -> list[tuple[str, float]]:
        """(label, probability) per image file, preprocessed as validation images were."""
        return self.labels(self.probabilities(self.decode(p) for p in paths))

    def labels(self, probs: np.ndarray) -> list[tuple[str, float]]:
        """(label, probability) of each row's most probable class."""
        return [(self.classes[int(i)], float(row[i])) for row, i in zip(probs, probs.argmax(1))]


def chunks(items: Iterable[Any], size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for item in items:
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


Item = TypeVar("Item")


def readable(read: Callable[[Item], np.ndarray], items: Sequence[Item], kept: list[int],
             skipped: list[Item]) -> Iterator[np.ndarray]:
    """The decoded images of `items` in order, without those that cannot be decoded (a search
    skips them too): `kept` collects the indices of the images yielded, `skipped` the others."""
    for i, item in enumerate(items):
        try:
            array = read(item)
        except DECODE_ERRORS:
            skipped.append(item)
            continue
        kept.append(i)
        yield array


def warn_skipped(skipped: Sequence[Any]) -> None:
    if skipped:
        print(f"warning: skipped {len(skipped)} unreadable image(s): {', '.join(map(str, skipped))}", file=sys.stderr)


def image_files(paths: Iterable[str | Path]) -> list[Path]:
    """Files as given (whatever their suffix: a bad one fails when decoded), folders as the images
    under them, recursively and sorted; hidden files are skipped, as the dataset listing skips them."""
    found: list[Path] = []
    for path in map(Path, paths):
        if path.is_dir():
            inside = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES
                            and not any(part.startswith(".") for part in p.relative_to(path).parts))
            if not inside:
                raise UsageError(f"folder {path} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
            found += inside
        elif path.is_file():
            found.append(path)
        else:
            raise UsageError(f"{path} not found")
    return found


def load(export_dir: str | Path) -> Predictor:
    """The export at `export_dir` (e.g. runs/hymenoptera/best) as a predictor."""
    model, meta, norm = load_exported(Path(export_dir))
    return Predictor(model, meta, norm)
