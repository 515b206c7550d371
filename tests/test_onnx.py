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
from tests.finals import candidate, ensemble, single
from tuning.app.export import export
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
    best = single(candidate(tmp_path_factory.mktemp("ckpt"), model, temperature=1.7, classes=3))
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
    assert "temperature 1.7" in meta["plain"]["output"]
    with torch.no_grad():  # the calibrated export: the plain network's logits divided by the temperature
        assert torch.allclose((net(plain_input) / 1.7).log_softmax(1), predictor.model(x), atol=1e-4)


@pytest.mark.parametrize("mirror", [False, True], ids=["centre", "mirror-averaged"])
def test_ensemble_onnx_equals_its_pytorch_output(tmp_path, images, mirror):
    """Three members frozen at 0, 2 and 4 stages share the pretrained prefix; the ONNX graph of
    the ensemble gives the probabilities the PyTorch predictor gives, and what averaging the
    members' tempered softmaxes gives (each member's logits averaged over the crop and its mirror
    first, with `mirror`)."""
    experiment = dataclasses.replace(EXPERIMENTS.get("hymenoptera"), image_size=40)
    torch.manual_seed(0)
    base = build_model("efficientnet_lite0", 3, None).state_dict()
    members, nets = [], []
    for i, (depth, weight, t) in enumerate([(0, 0.5, 1.3), (2, 0.25, 0.8), (4, 0.25, 2.0)]):
        net = build_model("efficientnet_lite0", 3, None, freeze_depth=depth)
        net.load_state_dict(base)
        with torch.no_grad():  # each member trains what it does not freeze
            for name, p in net.named_parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.05)
        nets.append((net.eval(), weight, t))
        members.append((candidate(tmp_path / f"m{i}", net, f"t{i}", temperature=t, classes=3), weight))
    final = ensemble(members)
    final.mirror = mirror
    out = export(final, experiment, ["a", "b", "c"], tmp_path / "run")
    meta = json.loads((out / "model.json").read_text())
    assert meta["final"]["kind"] == "ensemble" and meta["plain"] is None and not (out / "model_plain.pt").exists()
    assert meta["final"]["mirror"] is mirror
    predictor = tuning.load(out)
    decoded = [predictor.decode(p) for p in images]
    ours = predictor.probabilities(decoded)
    x = predictor.norm(predictor.crops(decoded))
    with torch.no_grad():
        logits = [(net(x) + net(x.flip(-1))) / 2 if mirror else net(x) for net, _, _ in nets]
        by_hand = sum(w * (z / t).softmax(1) for z, (_, w, t) in zip(logits, nets)).numpy()
        unmirrored = sum(w * (net(x) / t).softmax(1) for net, w, t in nets).numpy()
    assert bool(np.abs(unmirrored - ours).max() > 1e-3) == mirror  # mirroring changes these networks' output
    graph = ort.InferenceSession(str(out / "model.onnx"))
    onnx_probs = graph.run(None, {"image": predictor.crops(decoded).numpy()})[0]
    assert np.abs(onnx_probs - ours).max() < 1e-4
    assert np.abs(by_hand - ours).max() < 1e-4
    assert np.abs(ours.sum(1) - 1).max() < 1e-5
