"""`python -m tuning.predict EXPORT_DIR PATH...`: label images with an exported model.

PATHs are image files or folders (their images, recursively). Prints one line per image: path,
label, probability (tab-separated); `--csv FILE` also writes them as CSV (path,label,probability).
A file that is not a readable image is left out and named in one warning on stderr."""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

from tuning.app.predictor import image_files, load, readable, warn_skipped
from tuning.app.location import fetch_export
from tuning.lib.errors import UsageError, exit_on_usage_error
from tuning.lib.files import write_atomic


def predict(export_dir: Path, paths: list[Path], batch_size: int = 32) -> list[tuple[str, str, float]]:
    """One row per readable image; unreadable ones are named in one warning, as tuning.evaluate
    does, so that one bad file among thousands costs only its own row."""
    predictor = load(export_dir)  # a wrong export is the first thing to say
    images = image_files(paths)
    predictor.batch_size = batch_size
    kept: list[int] = []
    skipped: list[Path] = []
    probs = predictor.probabilities(readable(predictor.read, images, kept, skipped))
    if not kept:
        raise UsageError(f"{skipped[0]} is not a readable image" if len(skipped) == 1
                         else f"none of the {len(skipped)} images is readable ({skipped[0]}, ...)")
    warn_skipped(skipped)
    return [(str(images[i]), label, prob) for i, (label, prob) in zip(kept, predictor.labels(probs))]


def write_csv(path: Path, rows: list[tuple[str, str, float]]) -> None:
    if not path.parent.is_dir():
        raise UsageError(f"--csv {path}: folder {path.parent} not found")
    out = io.StringIO()  # written whole afterwards: never half a file
    csv.writer(out, lineterminator="\n").writerows(
        [["path", "label", "probability"], *[[p, label, f"{prob:.6f}"] for p, label, prob in rows]])
    write_atomic(path, out.getvalue())


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tuning.predict", description=__doc__.split("\n")[0])
    parser.add_argument("export_dir", help="an export, e.g. runs/hymenoptera/best or s3://bucket/runs/NAME/best")
    parser.add_argument("images", type=Path, nargs="+", help="image files or folders of images")
    parser.add_argument("--csv", type=Path, help="also write path,label,probability rows to this file")
    parser.add_argument("--batch-size", type=int, default=32, help="images per forward pass (default 32)")
    args = parser.parse_args(argv)
    with exit_on_usage_error("tuning.predict"):
        if args.batch_size <= 0:
            raise UsageError(f"--batch-size must be a positive integer, got {args.batch_size}")
        rows = predict(fetch_export(args.export_dir), args.images, args.batch_size)
        if args.csv:
            write_csv(args.csv, rows)
    for path, label, prob in rows:
        print(f"{path}\t{label}\t{prob:.4f}")
    if args.csv:
        print(f"wrote {args.csv}", file=sys.stderr)
    sys.stdout.flush()


if __name__ == "__main__":
    main()
