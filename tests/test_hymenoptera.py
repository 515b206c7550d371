"""The real tutorial data (found through TUNING_DATA_ROOT): weights, a smoke search, predict."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import hymenoptera_root
from tuning.lib.backbones import BACKBONES, load_pretrained
from tuning.lib.data.decode import load
from tuning.lib.data.sources import DATASETS
from tuning.lib.data.transforms import Normalize, eval_batch

ROOT = hymenoptera_root()
pytestmark = pytest.mark.skipif(ROOT is None, reason="set TUNING_DATA_ROOT to the folder holding hymenoptera_data")
IMAGENET_ANT, IMAGENET_BEE = 310, 309


def test_packaged_lite0_weights_recognise_ants_and_bees_zero_shot():
    """The TF-ported weights with TF 'same' padding and mean=std=0.5 name the exact ImageNet class
    for 128 of the 153 val images; a wrong key mapping or normalisation falls far below."""
    data = load(DATASETS.get("hymenoptera"), ROOT, resize=256)
    assert data.classes == ["ants", "bees"]
    assert len(data.splits["val"]) == 153 and len(data.splits["train"]) >= 244
    spec = BACKBONES.get("efficientnet_lite0")
    net = spec.build().eval()
    load_pretrained(spec, net, spec.default_weights())
    val = data.splits["val"]
    x, norm = eval_batch(val.images, 224), Normalize(spec.mean, spec.std)
    with torch.no_grad():
        pred = torch.cat([net(norm(x[i : i + 64])).argmax(1) for i in range(0, len(x), 64)])
    want = torch.tensor([IMAGENET_ANT if c == 0 else IMAGENET_BEE for c in val.labels])
    assert int((pred == want).sum()) >= 125


def test_smoke_search_exports_a_model_that_predicts(tmp_path):
    run = subprocess.run(
        [sys.executable, "-m", "tuning.run", "hymenoptera", "--smoke-test", "--storage", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert "best val_acc" in run.stdout and "tensorboard --logdir" in run.stdout
    export = tmp_path / "hymenoptera" / "best"
    meta = json.loads((export / "model.json").read_text())
    assert meta["classes"] == ["ants", "bees"] and meta["backbone"] == "efficientnet_lite0"
    images = sorted((ROOT / "hymenoptera_data" / "val" / "bees").glob("*.jpg"))[:3]
    images += sorted((ROOT / "hymenoptera_data" / "val" / "ants").glob("*.jpg"))[:2]
    out = subprocess.run(
        [sys.executable, "-m", "tuning.predict", str(export), *map(str, images)],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode == 0, out.stderr
    lines = out.stdout.strip().splitlines()
    assert len(lines) == 5
    for line, image in zip(lines, images):
        path, label, prob = line.split("\t")
        assert path == str(image) and label in ("ants", "bees") and 0.5 <= float(prob) <= 1.0
