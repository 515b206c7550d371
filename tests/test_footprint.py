"""What a trial asks Ray for: memory measured from what autograd saves, by batch size and depth."""
from __future__ import annotations

import pytest
import torch

from tuning.app.search import Placement, trial_resources
from tuning.lib import footprint
from tuning.lib.model import build_model

LITE0 = "efficientnet_lite0"


def test_saved_bytes_are_per_image_and_shrink_as_stages_freeze():
    model = build_model(LITE0, 2, None)
    two = footprint.saved_bytes_per_image(model, 64, 3, images=2)
    four = footprint.saved_bytes_per_image(model, 64, 3, images=4)
    # linear in the batch: the per-image figure hardly depends on the probe's batch (BatchNorm's
    # per-channel statistics, about 0.3 MB a step here, are the only constant left)
    assert four > 0 and two == pytest.approx(four, rel=0.02)
    need = footprint.measure(LITE0, 64)
    assert need.per_image[0] == two
    assert len(need.per_image) == len(model.stages) + 1
    assert list(need.per_image) == sorted(need.per_image, reverse=True)
    assert need.per_image[-1] < need.per_image[0] / 100  # fully frozen: only the head's input
    # the stem alone at 64 px: its convolution, BatchNorm and activation each keep a copy of 32x32x32
    assert need.per_image[0] - need.per_image[1] >= 2 * 32 * 32 * 32 * 4


def test_one_channel_input_saves_less_than_rgb_at_the_first_stage():
    rgb, gray = footprint.measure(LITE0, 64), footprint.measure(LITE0, 64, image_mode="L")
    assert gray.per_image[0] < rgb.per_image[0] and gray.per_image[1:] == rgb.per_image[1:]


def test_a_trial_asks_for_base_plus_batch_times_its_depths_bytes():
    need = footprint.Footprint(base_bytes=footprint.GIB, per_image=(80 * 2**20, 40 * 2**20, 2**20))
    resources = trial_resources(Placement(cpus_per_trial=1), need, largest_node=16 * footprint.GIB)

    def config(batch_size: int, freeze_depth: int) -> dict:
        return {"lr": 1e-3, "head_lr_mult": 10.0, "batch_size": batch_size, "freeze_depth": freeze_depth}

    bundle = resources(config(64, 0)).bundles[0]
    assert bundle["CPU"] == 1 and bundle["memory"] == footprint.GIB + 64 * 80 * 2**20  # 6 GiB, on a step
    assert resources(config(8, 2)).bundles[0]["memory"] == 1.25 * footprint.GIB  # rounded up
    # larger than any node: runs alone on the largest rather than waiting forever
    small_node = trial_resources(Placement(), need, largest_node=4 * footprint.GIB)
    assert small_node(config(64, 0)).bundles[0]["memory"] == 4 * footprint.GIB
    # on a GPU the activations are in GPU memory: the host holds the worker only
    gpu = trial_resources(Placement(gpus_per_trial=0.5), need, largest_node=16 * footprint.GIB)
    bundle = gpu(config(64, 0)).bundles[0]
    assert bundle["GPU"] == 0.5 and bundle["memory"] == footprint.GIB


def test_the_estimate_covers_a_real_training_step():
    """The probe counts what a real backward needs: a step's saved tensors at batch 4 are 4x the figure."""
    model = build_model(LITE0, 2, None, freeze_depth=3)
    per_image = footprint.saved_bytes_per_image(model, 64, 3)
    sizes: dict[int, int] = {}

    def pack(t):
        sizes[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    x = torch.randn(4, 3, 64, 64)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).logsumexp(1).mean()
    loss.backward()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = sum(v for k, v in sizes.items() if k not in params)
    assert 0.95 * 4 * per_image <= saved <= 4 * per_image  # covered, and not by a wide margin
