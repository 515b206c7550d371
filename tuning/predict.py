"""`python -m tuning.predict EXPORT_DIR IMAGE...`: label images with an exported model.

Prints one line per image: path, label, probability (tab-separated)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tuning.app.predictor import load
from tuning.lib.errors import exit_on_usage_error


def predict(export_dir: Path, images: list[Path]) -> list[tuple[str, str, float]]:
    rows = load(export_dir).predict(images)
    return [(str(path), label, prob) for path, (label, prob) in zip(images, rows)]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tuning.predict", description=__doc__.split("\n")[0])
    parser.add_argument("export_dir", type=Path, help="an export, e.g. runs/hymenoptera/best")
    parser.add_argument("images", type=Path, nargs="+", help="image files to label")
    args = parser.parse_args(argv)
    with exit_on_usage_error("tuning.predict"):
        for path, label, prob in predict(args.export_dir, args.images):
            print(f"{path}\t{label}\t{prob:.4f}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
