"""The export outside this package: model.onnx in onnxruntime (no PyTorch in the process) and
model_plain.pt in plain timm/torchvision give what `tuning.predict` gives."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import timm
import torch
import torchvision

import tuning
from experiments import EXPERIMENTS
from tests.conftest import make_image_folder
from tuning.app.export import Best, export
from tuning.lib.checkpoint import CHECKPOINT_FILE
from tuning.lib.model import build_model

CASES = [  # backbone, image mode, gray input
    ("efficientnet_lite0", "RGB", "sum"),  # timm's TF-"same" padding
    ("efficientnet_lite0", "L", "sum"),  # MNIST: a one-channel first convolution
    ("resnet18", "L", "repeat"),  # torchvision; gray repeated to RGB inside the graph
]


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> list[Path]:
    root = make_image_folder(tmp_path_factory.mktemp("imgs"), {"val": 4}, classes=("a", "b", "c"))
    return sorted(root.rglob("*.*"))


@pytest.fixture(scope="module", params=CASES, ids=["-".join(c) for c in CASES])
def tiny_export(request, tmp_path_factory) -> Path:
    """An export of a randomly initialised network (its outputs are far from uniform), 40 px."""
    backbone, mode, gray = request.param
    experiment = dataclasses.replace(EXPERIMENTS.get("hymenoptera"), backbone=backbone, image_mode=mode,
                                     gray_input=gray, image_size=40)
    torch.manual_seed(0)
    model = build_model(backbone, 3, None, image_mode=mode, gray_input=gray)
    ckpt = tmp_path_factory.mktemp("ckpt")
    torch.save({"model": model.state_dict(), "epoch": 1}, ckpt / CHECKPOINT_FILE)
    best = Best("t1", {"lr": 0.1}, {"val_acc": 0.5, "epoch": 1}, str(ckpt))
    return export(best, experiment, ["a", "b", "c"], tmp_path_factory.mktemp("run"))


def test_model_json_documents_the_onnx_input(tiny_export):
    meta = json.loads((tiny_export / "model.json").read_text())
    graph = ort.InferenceSession(str(tiny_export / meta["onnx"]["file"]))
    (inp,), (out,) = graph.get_inputs(), graph.get_outputs()
    channels = 1 if meta["image_mode"] == "L" else 3
    assert meta["onnx"]["input"]["shape"] == ["batch", channels, 40, 40] and meta["onnx"]["input"]["dtype"] == "uint8"
    assert (inp.name, inp.type, inp.shape[1:]) == (meta["onnx"]["input"]["name"], "tensor(uint8)", [channels, 40, 40])
    assert isinstance(inp.shape[0], str) and out.shape[1] == 3  # a dynamic batch axis


def test_onnxruntime_without_torch_agrees_with_predict(tiny_export, images, tmp_path):
    predictor = tuning.load(tiny_export)
    crops = predictor.crops([predictor.decode(p) for p in images]).numpy()
    np.save(tmp_path / "crops.npy", crops)
    script = (  # torch cannot be imported in this process: onnxruntime alone runs the graph
        "import sys; sys.modules['torch'] = None\n"
        "import numpy as np, onnxruntime as ort\n"
        f"s = ort.InferenceSession({str(tiny_export / 'model.onnx')!r})\n"
        f"x = np.load({str(tmp_path / 'crops.npy')!r})\n"
        "np.save(sys.argv[1], np.concatenate([s.run(None, {'image': x[:5]})[0], s.run(None, {'image': x[5:]})[0]]))\n"
    )
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "p.npy")], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    probs = np.load(tmp_path / "p.npy")
    ours = predictor.predict(images)
    assert [predictor.classes[i] for i in probs.argmax(1)] == [label for label, _ in ours]
    assert np.abs(probs - predictor.probabilities(predictor.decode(p) for p in images)).max() < 1e-4
    assert np.abs(probs.max(1) - [p for _, p in ours]).max() < 1e-4
    assert len({label for label, _ in ours}) > 1 or probs.max() < 0.99  # not a degenerate network


def test_plain_state_dict_loads_into_the_library_network(tiny_export, images):
    meta = json.loads((tiny_export / "model.json").read_text())
    scope = {"timm": timm, "torchvision": torchvision, "torch": torch}
    exec(meta["plain"]["build"], scope)  # e.g. net = timm.create_model('tf_efficientnet_lite0', num_classes=3)
    net = scope["net"].eval()
    net.load_state_dict(torch.load(tiny_export / meta["plain"]["file"], weights_only=True), strict=True)
    predictor = tuning.load(tiny_export)
    x = predictor.norm(predictor.crops([predictor.decode(p) for p in images]))
    if meta["gray_input"] == "repeat" and meta["image_mode"] == "L":
        assert "repeated 3 times" in meta["plain"]["input"]
        plain_input = x.expand(-1, 3, -1, -1)
    else:
        plain_input = x
    with torch.no_grad():
        assert torch.allclose(net(plain_input), predictor.model(x), atol=1e-4)
