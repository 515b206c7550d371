"""A predictor made from an export alone: the network, its classes and validation's preprocessing."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tuning.app.export import load_exported
from tuning.lib.data.decode import UndecodableImage, decode
from tuning.lib.data.transforms import Normalize, center_crop
from tuning.lib.errors import UsageError
from tuning.lib.model import FineTuneNet


@dataclass
class Predictor:
    model: FineTuneNet
    meta: dict[str, Any]
    norm: Normalize

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    def predict(self, paths: list[str | Path]) -> list[tuple[str, float]]:
        """(label, probability) per image, preprocessed as validation images were."""
        rows = []
        for path in paths:
            try:
                array = decode(path, self.meta["resize"], self.meta.get("image_mode", "RGB"))
                x = self.norm(center_crop(array, self.meta["image_size"]).unsqueeze(0))
            except UndecodableImage:
                raise UsageError(f"{path} is not a readable image") from None
            with torch.no_grad():
                probs = self.model(x).softmax(1)[0]
            p, i = probs.max(0)
            rows.append((self.classes[int(i)], float(p)))
        return rows


def load(export_dir: str | Path) -> Predictor:
    """The export at `export_dir` (e.g. runs/hymenoptera/best) as a predictor."""
    model, meta, norm = load_exported(Path(export_dir))
    return Predictor(model, meta, norm)
