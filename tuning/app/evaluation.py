"""Judge an export on labelled images: accuracy and per-class precision/recall (scikit-learn), and
the two pictures of tuning.app.figures (a confusion matrix, a gallery of the mistakes).

The images are a folder of class subfolders, or a split of the run that made the export, listed
again from the run's own Experiment (run.json: same seed, same per_class), so "val" here is the
very split the export's val_acc was measured on."""
from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
from sklearn.metrics import accuracy_score, classification_report

from experiments import get_experiment
from experiments.base import Experiment
from tuning.app.predictor import Predictor, readable, warn_skipped
from tuning.app.rundir import SPEC_FILE, load_spec
from tuning.lib.data.decode import decode, prepare
from tuning.lib.data.fetch import resolve_data_root
from tuning.lib.data.listing import scan_split
from tuning.lib.data.sources import create_source
from tuning.lib.errors import UsageError

Reader = Callable[[str], np.ndarray]  # an image's ref -> uint8 HWC at the export's decode size


@dataclass
class Labelled:
    """Images to score, before decoding: refs, true class indices (the export's), how to decode."""

    refs: list[str]
    labels: np.ndarray
    read: Reader
    source: str  # what they are, for titles and messages
    tag: str  # a short name for them: the split ("val"), or "folder-" and the folder's name


@dataclass
class Scored:
    classes: list[str]
    images: Labelled  # the images scored (unreadable ones dropped)
    probs: np.ndarray  # (N, classes)

    @property
    def predicted(self) -> np.ndarray:
        return self.probs.argmax(1)

    @property
    def accuracy(self) -> float:
        return float(accuracy_score(self.images.labels, self.predicted))

    def report(self) -> str:
        """Accuracy, then per-class precision, recall, F1 and support."""
        k = len(self.classes)
        table = classification_report(self.images.labels, self.predicted, labels=list(range(k)),
                                      target_names=self.classes, digits=4, zero_division=0)
        return f"{self.images.source}: {len(self.images.refs)} images, accuracy {self.accuracy:.4f}\n\n{table}"


def score(predictor: Predictor, images: Labelled) -> Scored:
    """Unreadable images are skipped with one warning, as a search skips them."""
    kept: list[int] = []
    skipped: list[str] = []
    probs = predictor.probabilities(readable(images.read, images.refs, kept, skipped))
    warn_skipped(skipped)
    if not kept:
        raise UsageError(f"{images.source} holds no readable image")
    scored = Labelled([images.refs[i] for i in kept], images.labels[kept], images.read, images.source, images.tag)
    return Scored(predictor.classes, scored, probs)


def folder_images(folder: Path, predictor: Predictor) -> Labelled:
    """`folder/CLASS/*`: class folders named as the export's classes (a subset is fine)."""
    if not folder.is_dir():
        raise UsageError(f"folder {folder} not found")
    found, items, _ = scan_split(folder)
    unknown = [c for c in found if c not in predictor.classes]
    if unknown:
        raise UsageError(f"{folder} has class folder(s) {', '.join(unknown)} that the export does not know "
                         f"(its classes: {', '.join(predictor.classes)})")
    labels = np.asarray([predictor.classes.index(found[item.label]) for item in items], dtype=np.int64)
    meta = predictor.meta
    read = lambda ref: decode(ref, meta["resize"], meta.get("image_mode", "RGB"))  # noqa: E731
    return Labelled([item.ref for item in items], labels, read, str(folder), f"folder-{folder.name}")


def run_experiment(export_dir: Path, meta: dict) -> Experiment:
    """The Experiment the export's run searched (run.json beside `best`), else the registered one
    the export names, with a warning: a smoke test's or an override's splits may differ from it."""
    for run_dir in (export_dir.parent, export_dir.resolve().parent.parent):
        if (run_dir / SPEC_FILE).is_file():
            return load_spec(run_dir)[0]
    experiment = get_experiment(meta["experiment"])
    print(f"warning: no {SPEC_FILE} beside {export_dir}; listing the registered experiment "
          f"{meta['experiment']!r} as it is defined now", file=sys.stderr)
    return experiment


def split_images(export_dir: Path, predictor: Predictor, data_root: str | None, split: str | None) -> Labelled:
    """A split of the export's run: `split`, else test if the dataset has one, else val."""
    experiment = run_experiment(export_dir, predictor.meta)
    listing = create_source(experiment.dataset).list(resolve_data_root(data_root), seed=experiment.seed,
                                                     per_class=experiment.per_class)
    if listing.classes != predictor.classes:
        raise UsageError(f"{experiment.dataset} has classes {listing.classes}, the export {predictor.classes}")
    name = split or ("test" if "test" in listing.splits else "val")
    if name not in listing.splits:
        raise UsageError(f"{experiment.dataset} has no {name} split (it has {', '.join(listing.splits)})")
    items = listing.splits[name]
    meta = predictor.meta
    read = lambda ref: prepare(listing.reader(ref), meta["resize"], meta.get("image_mode", "RGB"), ref)  # noqa: E731
    subset = f", {experiment.per_class} per class" if experiment.per_class else ""
    return Labelled([item.ref for item in items], np.asarray([item.label for item in items], dtype=np.int64),
                    read, f"{experiment.dataset} {name} (seed {experiment.seed}{subset})", name)
