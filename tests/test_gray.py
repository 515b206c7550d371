"""One-channel input: the first convolution adapted by summing its pretrained RGB kernels, or the
gray channel repeated three times; normalisation and the optimizer choice."""
from __future__ import annotations

import pytest
import torch

from trainables.finetune import build_optimizer
from tuning.lib.backbones import BACKBONES
from tuning.lib.data.transforms import Normalize
from tuning.lib.hparams import HParams
from tuning.lib.model import build_model

LITE0 = "efficientnet_lite0"


@pytest.fixture(scope="module")
def lite0_weights():
    return BACKBONES.get(LITE0).default_weights()


def test_summed_kernel_is_the_sum_of_the_pretrained_rgb_kernels(lite0_weights):
    packaged = torch.load(lite0_weights, weights_only=True)["_conv_stem.weight"]
    model = build_model(LITE0, 10, lite0_weights, image_mode="L")
    stem = model.stages[0][0]
    assert BACKBONES.get(LITE0).first_conv(BACKBONES.get(LITE0).build()).in_channels == 3
    assert stem.weight.shape == (32, 1, 3, 3) and stem.in_channels == 1
    assert torch.equal(stem.weight, packaged.sum(1, keepdim=True))


def test_resnet_first_conv_is_adapted_too(tmp_path):
    import torchvision

    net = torchvision.models.resnet18()
    weights = tmp_path / "r18.pth"
    torch.save(net.state_dict(), weights)
    model = build_model("resnet18", 3, weights, image_mode="L")
    assert torch.equal(model.stages[0][0].weight, net.conv1.weight.sum(1, keepdim=True))
    assert model(torch.rand(2, 1, 32, 32)).shape == (2, 3)


def test_sum_and_repeat_compute_the_same_function_on_gray_images(lite0_weights):
    summed = build_model(LITE0, 4, lite0_weights, image_mode="L").eval()
    repeated = build_model(LITE0, 4, lite0_weights, image_mode="L", gray_input="repeat").eval()
    repeated.head.load_state_dict(summed.head.state_dict())
    rgb = build_model(LITE0, 4, lite0_weights).eval()
    rgb.head.load_state_dict(summed.head.state_dict())
    gray = torch.rand(3, 1, 48, 48)
    norm = Normalize.for_mode((0.5,) * 3, (0.5,) * 3, "L")
    with torch.no_grad():
        out = summed(norm(gray.mul(255).round()))
        assert torch.allclose(out, repeated(norm(gray.mul(255).round())), atol=1e-4)
        # what the RGB network says of the gray image replicated to R = G = B
        assert torch.allclose(out, rgb(norm(gray.mul(255).round()).expand(-1, 3, -1, -1)), atol=1e-4)
    assert repeated.stages[0][0].weight.shape[1] == 3


def test_normalize_for_one_channel_averages_the_rgb_statistics():
    norm = Normalize.for_mode((0.485, 0.456, 0.406), (0.229, 0.224, 0.225), "L")
    assert norm.mean == pytest.approx((0.449,)) and norm.std == pytest.approx((0.226,))
    assert Normalize.for_mode((0.5,) * 3, (0.5,) * 3, "RGB").mean == (0.5, 0.5, 0.5)
    assert norm(torch.full((1, 1, 2, 2), 255, dtype=torch.uint8)).shape == (1, 1, 2, 2)
    with pytest.raises(ValueError):
        Normalize.for_mode((0.5,) * 3, (0.5,) * 3, "CMYK")


def test_bad_gray_input_is_refused():
    with pytest.raises(ValueError, match="gray_input 'mean'"):
        build_model(LITE0, 2, None, image_mode="L", gray_input="mean")


@pytest.mark.parametrize("name, cls", [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam)])
def test_the_searched_optimizer_is_built_over_both_groups(name, cls):
    model = build_model(LITE0, 2, None, freeze_depth=3)
    hp = HParams(lr=1e-3, head_lr_mult=10, freeze_depth=3, batch_size=8, optimizer=name, weight_decay=1e-4)
    opt = build_optimizer(model, hp)
    assert type(opt) is cls
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in opt.param_groups] == [
        ("backbone", 1e-3, 1e-4), ("head", pytest.approx(1e-2), 1e-4)]
    with pytest.raises(ValueError, match="neither"):
        build_optimizer(model, HParams(lr=1e-3, head_lr_mult=1, freeze_depth=0, batch_size=8, optimizer="lbfgs"))
