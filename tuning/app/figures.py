"""The pictures that judge a model: its confusion matrix and a gallery of the images it got wrong."""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from sklearn.metrics import ConfusionMatrixDisplay  # noqa: E402

from tuning.app.evaluation import Scored  # noqa: E402
from tuning.lib.data.transforms import center_crop  # noqa: E402
from tuning.lib.files import atomic_path  # noqa: E402


def save(fig: Figure, out: Path) -> Path:
    with atomic_path(out) as tmp:
        fig.savefig(tmp, format="png", dpi=110)
    plt.close(fig)
    return out


def confusion_png(scored: Scored, out: Path, title: str | None = None) -> Path:
    """Counts, true class down, predicted across; the numbers are left out past 20 classes."""
    k = len(scored.classes)
    side = min(4 + 0.45 * k, 30)
    fig, ax = plt.subplots(figsize=(side, side * 0.9))
    ConfusionMatrixDisplay.from_predictions(
        scored.images.labels, scored.predicted, labels=list(range(k)), display_labels=scored.classes,
        ax=ax, cmap="Blues", colorbar=False, include_values=k <= 20, xticks_rotation="vertical" if k > 6 else "horizontal",
    )
    ax.set_title(title or f"{scored.images.source}\naccuracy {scored.accuracy:.4f} ({len(scored.probs)} images)",
                 fontsize=10)
    fig.tight_layout()
    return save(fig, out)


def misclassified_png(scored: Scored, out: Path, size: int, limit: int = 48) -> Path:
    """The wrongly labelled images, most confident mistake first, as the network saw them (the
    centre crop), titled with the predicted label and its probability and the true label."""
    wrong = [i for i in (-scored.probs.max(1)).argsort(kind="stable") if scored.predicted[i] != scored.images.labels[i]]
    shown = wrong[:limit]
    cols = max(1, min(8, len(shown)))
    rows = max(1, math.ceil(len(shown) / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(1.9 * cols + 0.4, 2.2 * rows + 0.6), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    classes = scored.classes
    for ax, i in zip(axes.flat, shown):
        crop = center_crop(scored.images.read(scored.images.refs[i]), size).permute(1, 2, 0).numpy()
        ax.imshow(crop[:, :, 0] if crop.shape[2] == 1 else crop, cmap="gray" if crop.shape[2] == 1 else None)
        p = scored.probs[i, scored.predicted[i]]
        ax.set_title(f"pred {classes[scored.predicted[i]]} {p:.2f}\ntrue {classes[scored.images.labels[i]]}",
                     fontsize=8, color="tab:red")
    head = f"{len(wrong)} of {len(scored.probs)} misclassified: {scored.images.source}"
    if len(wrong) > len(shown):
        head += f" (the {len(shown)} most confident shown)"
    if not wrong:
        axes.flat[0].text(0.5, 0.5, "no misclassified images", ha="center", va="center", fontsize=11)
    fig.suptitle(head, fontsize=9)
    fig.tight_layout()
    return save(fig, out)
