"""`python -m tuning.evaluate EXPORT_DIR [FOLDER]`: score an export on labelled images.

FOLDER holds one subfolder per class; without it, the split of the export's own run is listed
again as the run listed it (run.json): test if the dataset has one, else val (or --split).
Prints accuracy and per-class precision/recall, and writes confusion_matrix.png and
misclassified.png (the mistakes, with predicted label and probability) to --out."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tuning.app.evaluation import Scored, folder_images, score, split_images
from tuning.app.figures import confusion_png, misclassified_png
from tuning.app.predictor import load
from tuning.app.location import fetch_export
from tuning.lib.errors import UsageError, exit_on_usage_error


def evaluate(export_dir: Path, folder: Path | None = None, *, data_root: str | None = None,
             split: str | None = None, out: Path | None = None) -> tuple[Scored, list[Path]]:
    """Score, then write the two PNGs to `out` (default: `eval-SPLIT` or `eval-folder-NAME` beside the export)."""
    predictor = load(export_dir)
    if folder is not None:
        if split is not None:
            raise UsageError("--split picks a split of the run; it does not apply to a FOLDER")
        images = folder_images(folder, predictor)
    else:
        images = split_images(export_dir, predictor, data_root, split)
    out = out or export_dir.parent / f"eval-{images.tag}"
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out} is not a folder")
    scored = score(predictor, images)
    out.mkdir(parents=True, exist_ok=True)
    pngs = [confusion_png(scored, out / "confusion_matrix.png"),
            misclassified_png(scored, out / "misclassified.png", predictor.meta["image_size"])]
    return scored, pngs


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tuning.evaluate", description=__doc__.split("\n")[0])
    parser.add_argument("export_dir", help="an export, e.g. runs/hymenoptera/best or s3://bucket/runs/NAME/best")
    parser.add_argument("folder", type=Path, nargs="?", help="labelled images: FOLDER/CLASS/IMAGE (default: the run's split)")
    parser.add_argument("--split", choices=("train", "val", "test"), help="the run's split to score (default: test, else val)")
    parser.add_argument("--data-root", help="folder holding the datasets (default: $TUNING_DATA_ROOT, else ./data)")
    parser.add_argument("--out", type=Path, help="where the PNGs go (default: eval-SPLIT or eval-folder-NAME beside the export)")
    args = parser.parse_args(argv)
    with exit_on_usage_error("tuning.evaluate"):
        scored, pngs = evaluate(fetch_export(args.export_dir), args.folder, data_root=args.data_root, split=args.split, out=args.out)
    print(scored.report())
    for png in pngs:
        print(f"wrote {png}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
