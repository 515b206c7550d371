"""`python -m tuning.predict EXPORT_DIR IMAGE...`: label images with an exported model.

Prints one line per image: path, label, probability (tab-separated)."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from tuning.errors import UsageError, exit_on_usage_error
from tuning.export import load_exported
from tuning.images import UndecodableImage, center_crop, decode


def predict(export_dir: Path, images: list[Path]) -> list[tuple[str, str, float]]:
    model, meta, norm = load_exported(export_dir)
    rows = []
    for path in images:
        try:
            # validation's preprocessing (images.eval_tensor), in the export's image mode
            array = decode(path, meta["resize"], meta.get("image_mode", "RGB"))
            x = norm(center_crop(array, meta["image_size"]).unsqueeze(0))
        except UndecodableImage:
            raise UsageError(f"{path} is not a readable image") from None
        with torch.no_grad():
            probs = model(x).softmax(1)[0]
        p, i = probs.max(0)
        rows.append((str(path), meta["classes"][int(i)], float(p)))
    return rows


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
