"""The network: stages, freezing, learning rates per parameter group, weight loading."""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
import torchvision

from trainables.finetune import build_optimizer, train_one_epoch
from tuning.lib.backbones import BACKBONES, LITE0_SHA256
from tuning.lib.checkpoint import Feed
from tuning.lib.data.decode import Split
from tuning.lib.data.transforms import Normalize, TrainViews
from tuning.lib.errors import UsageError
from tuning.lib.hparams import HParams
from tuning.lib.model import build_model

LITE0 = "efficientnet_lite0"


def tiny_split(n: int = 8, size: int = 40) -> Split:
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (size, size, 3), dtype=np.uint8) for _ in range(n)]
    return Split(images, np.arange(n) % 2)


@pytest.fixture(scope="module")
def lite0_weights() -> Path:
    return BACKBONES.get(LITE0).default_weights()


def test_lite0_weights_file_is_the_checked_one(lite0_weights):
    assert hashlib.sha256(lite0_weights.read_bytes()).hexdigest() == LITE0_SHA256


def test_lite0_loads_every_packaged_tensor_in_order(lite0_weights):
    packaged = torch.load(lite0_weights, weights_only=True)
    model = build_model(LITE0, 2, lite0_weights)
    stem_conv = model.stages[0][0]
    assert torch.equal(stem_conv.weight, packaged["_conv_stem.weight"])
    last_bn = model.stages[-1][1]
    assert torch.equal(last_bn.running_var, packaged["_bn1.running_var"])


@pytest.mark.parametrize("depth", [0, 4, 9])
def test_frozen_stages_are_bit_identical_after_training(lite0_weights, depth):
    model = build_model(LITE0, 2, lite0_weights, freeze_depth=depth)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hp = HParams(lr=0.05, head_lr_mult=10, freeze_depth=depth, batch_size=4)
    torch.manual_seed(0)
    split, views, norm = tiny_split(), TrainViews(32), Normalize((0.5,) * 3, (0.5,) * 3)
    feed = Feed(torch.from_numpy(split.labels),
                lambda idx: model.frozen_features(norm(views.batch(split.images, idx, 0))), cached=False)
    train_one_epoch(model, build_optimizer(model, hp), feed, 4)
    after = model.state_dict()
    for i in range(len(model.stages)):
        keys = [k for k in before if k.startswith(f"stages.{i}.") and "num_batches" not in k]
        same = all(torch.equal(before[k], after[k]) for k in keys)
        assert same == (i < depth), f"stage {i} (freeze_depth {depth}): unchanged={same}"
    assert not torch.equal(before["head.weight"], after["head.weight"])


def test_param_groups_carry_lr_and_lr_times_mult(lite0_weights):
    model = build_model(LITE0, 3, lite0_weights, freeze_depth=2)
    opt = build_optimizer(model, HParams(lr=2e-3, head_lr_mult=7.0, freeze_depth=2, batch_size=8))
    groups = {g["name"]: g for g in opt.param_groups}
    assert groups["backbone"]["lr"] == pytest.approx(2e-3)
    assert groups["head"]["lr"] == pytest.approx(14e-3)
    head_ids = {id(p) for p in model.head.parameters()}
    assert {id(p) for p in groups["head"]["params"]} == head_ids
    frozen = {id(p) for s in model.stages[:2] for p in s.parameters()}
    assert not frozen & {id(p) for p in groups["backbone"]["params"]}


def test_full_freeze_trains_only_the_head(lite0_weights):
    model = build_model(LITE0, 2, lite0_weights, freeze_depth=BACKBONES.get(LITE0).num_stages)
    opt = build_optimizer(model, HParams(lr=1e-3, head_lr_mult=10, freeze_depth=9, batch_size=8))
    assert [g["name"] for g in opt.param_groups] == ["head"]
    model.train()
    assert all(not m.training for stage in model.stages for m in stage.modules())


def test_head_is_fresh_and_sized_to_the_classes(lite0_weights):
    model = build_model(LITE0, 5, lite0_weights)
    assert model.head.out_features == 5
    assert torch.count_nonzero(model.head.bias) == 0


def test_the_network_runs_channels_last_and_computes_what_nchw_computes(lite0_weights):
    """channels_last is a layout, not another function: the NCHW network (the seeds' layout) gives
    the same logits up to float rounding, and NCHW inputs (the feature cache's arrays) are taken."""
    torch.manual_seed(0)
    nhwc = build_model(LITE0, 2, lite0_weights, freeze_depth=4).eval()
    torch.manual_seed(0)
    nchw = build_model(LITE0, 2, lite0_weights, freeze_depth=4, channels_last=False).eval()
    assert nhwc.stages[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    assert not nchw.stages[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = nhwc.frozen_features(x)
        assert features.is_contiguous(memory_format=torch.channels_last)
        logits = nhwc.trainable_forward(features.contiguous())  # as read back from the cache
        torch.testing.assert_close(logits, nchw(x), rtol=1e-4, atol=1e-4)
        assert torch.equal(logits, nhwc(x))


def test_resnet_loads_an_explicit_state_dict(tmp_path):
    reference = torchvision.models.resnet18()
    path = tmp_path / "r18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("resnet18", 2, path)
    assert torch.equal(model.stages[1][0].conv1.weight, reference.layer1[0].conv1.weight)


def test_resnet_weights_come_from_the_hub_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    cached = tmp_path / "hub" / "checkpoints" / Path(url).name
    cached.parent.mkdir(parents=True)
    torch.save(torchvision.models.resnet18().state_dict(), cached)
    assert BACKBONES.get("resnet18").default_weights() == cached


def test_resnet_without_cache_or_network_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))

    def offline(*args, **kwargs):
        raise OSError("network unreachable")

    monkeypatch.setattr(torch.hub, "download_url_to_file", offline)
    with pytest.raises(UsageError, match="--weights FILE"):
        BACKBONES.get("resnet34").default_weights()


def test_weights_of_another_network_are_refused(tmp_path):
    path = tmp_path / "r18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), path)
    with pytest.raises(UsageError, match="does not match this backbone: it holds 122 tensors"):
        build_model(LITE0, 2, path)
    junk = tmp_path / "junk.pth"
    junk.write_text("not a checkpoint")
    with pytest.raises(UsageError, match="not a loadable state dict"):
        build_model("resnet18", 2, junk)
