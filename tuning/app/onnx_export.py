"""The export as ONNX, for runtimes without PyTorch (onnxruntime, TensorRT, browsers).

The graph takes what decoding and centre-cropping give, uint8 pixels NCHW at the crop size, and
returns class probabilities: the cast, the /255, the backbone's normalisation and the softmax are
inside it, so a caller needs no statistics from model.json, only the crop. The batch axis is
dynamic. `onnx_meta` is what model.json says about it."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tuning.lib.data.transforms import Normalize
from tuning.lib.model import FineTuneNet

ONNX_FILE = "model.onnx"
INPUT_NAME = "image"
OUTPUT_NAME = "probabilities"
OPSET = 18


class Deployable(nn.Module):
    """uint8 crops in, probabilities out: the predictor's normalisation and softmax around the net."""

    def __init__(self, model: FineTuneNet, norm: Normalize) -> None:
        super().__init__()
        self.model = model
        self.register_buffer("mean", torch.tensor(norm.mean).view(1, -1, 1, 1) * 255.0)
        self.register_buffer("std", torch.tensor(norm.std).view(1, -1, 1, 1) * 255.0)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # (x / 255 - mean) / std, folded into one subtraction and one division
        return self.model((image.float() - self.mean) / self.std).softmax(1)


def channels(meta: dict[str, Any]) -> int:
    return 1 if meta.get("image_mode", "RGB") == "L" else 3


def onnx_meta(meta: dict[str, Any]) -> dict[str, Any]:
    """How to feed model.onnx, for model.json: a runtime reads the input's shape and type here."""
    size = meta["image_size"]
    return {
        "file": ONNX_FILE,
        "opset": OPSET,
        "input": {"name": INPUT_NAME, "dtype": "uint8", "layout": "NCHW",
                  "shape": ["batch", channels(meta), size, size],
                  "channels": "RGB" if channels(meta) == 3 else "L (gray)",
                  "preprocess": f"decode as {meta.get('image_mode', 'RGB')}, resize (bilinear) so the shorter "
                                f"side is {meta['resize']} px, centre-crop {size}x{size}; pixel values 0..255, "
                                "normalisation is inside the graph"},
        "output": {"name": OUTPUT_NAME, "dtype": "float32", "shape": ["batch", len(meta["classes"])],
                   "meaning": "softmax probabilities, in the order of `classes`"},
    }


def write_onnx(model: FineTuneNet, norm: Normalize, meta: dict[str, Any], path: Path) -> Path:
    """Trace the eval-mode network into one self-contained file. The TorchScript exporter, not the
    dynamo one: the same graph to 1e-4 (tests/test_onnx.py) in a fraction of the time, and every
    search exports (benchmarks/README.md, "By hand"); its deprecation notice is ours to carry, not
    the user's to read."""
    size = meta["image_size"]
    wrapped = Deployable(model.eval(), norm).eval()
    example = torch.zeros(2, channels(meta), size, size, dtype=torch.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            wrapped, (example,), str(path), dynamo=False, input_names=[INPUT_NAME], output_names=[OUTPUT_NAME],
            dynamic_axes={INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}, opset_version=OPSET,
        )
    return path
