"""What a trial asks Ray for: memory measured from what autograd saves, by batch size and depth."""
from __future__ import annotations

import pytest
import torch

from tests.test_model import tiny_split
from trainables.finetune import build_optimizer, train_one_epoch
from tuning.app.search import Placement, step_images, trial_resources
from tuning.lib import footprint
from tuning.lib.checkpoint import Feed
from tuning.lib.data.transforms import Normalize, TrainViews
from tuning.lib.hparams import HParams
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


def node(gib: float, cpus: int = 2) -> list[dict]:
    return [{"Alive": True, "Resources": {"CPU": cpus, "memory": gib * footprint.GIB}}]


def config(batch_size: int, freeze_depth: int) -> dict:
    return {"lr": 1e-3, "head_lr_mult": 10.0, "batch_size": batch_size, "freeze_depth": freeze_depth}


def test_a_trial_asks_for_base_plus_batch_times_its_depths_bytes():
    need = footprint.Footprint(base_bytes=footprint.GIB, per_image=(80 * 2**20, 40 * 2**20, 2**20))
    whole = Placement(cpus_per_trial=1, step_memory_gb=0)  # batches never split
    resources = trial_resources(whole, need, node(16))

    bundle = resources(config(64, 0)).bundles[0]
    assert bundle["CPU"] == 1 and bundle["memory"] == footprint.GIB + 64 * 80 * 2**20  # 6 GiB, on a step
    assert resources(config(8, 2)).bundles[0]["memory"] == 1.25 * footprint.GIB  # rounded up
    # larger than any node: runs alone on the largest rather than waiting forever
    small_node = trial_resources(whole, need, node(4))
    assert small_node(config(64, 0)).bundles[0]["memory"] == 4 * footprint.GIB
    # on a GPU the activations are in GPU memory: the host holds the worker only
    gpu = trial_resources(Placement(gpus_per_trial=0.5), need, node(16))
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


@pytest.mark.parametrize("batch, most, parts", [
    (64, 20, [16, 16, 16, 16]), (64, 64, [64]), (64, 100, [64]), (32, 20, [16, 16]), (7, 3, [3, 2, 2]),
    (5, 2, [3, 2]), (3, 2, [3]), (2, 2, [2]), (1, 2, [1]),
])
def test_micro_batches_are_the_fewest_even_parts_and_never_one_image(batch, most, parts):
    assert footprint.micro_batches(batch, most) == parts


def test_a_split_batch_asks_only_for_its_largest_micro_batch():
    need = footprint.Footprint(base_bytes=footprint.GIB, per_image=(80 * 2**20, 40 * 2**20, 2**20))
    placement = Placement(step_memory_gb=1.25)  # 16 images at depth 0, 32 at depth 1
    assert step_images(placement, need) == (16, 32, 1280)
    resources = trial_resources(placement, need, node(4))  # 2 slots x 2.25 GiB do not fit in 4
    assert resources(config(64, 0)).bundles[0]["memory"] == footprint.GIB + 16 * 80 * 2**20  # 4 x 16
    assert resources(config(64, 1)).bundles[0]["memory"] == footprint.GIB + 32 * 40 * 2**20  # 2 x 32
    assert resources(config(8, 0)).bundles[0]["memory"] == 1.75 * footprint.GIB  # whole: 1 GiB + 640 MiB, rounded up
    # on a GPU, or with 0, batches stay whole
    assert step_images(Placement(gpus_per_trial=0.5, step_memory_gb=1.25), need) == ()
    assert step_images(Placement(step_memory_gb=0), need) == ()


@pytest.mark.parametrize("step", [None, 3])
def test_micro_batches_take_the_whole_batchs_step(step):
    """Head only (no BatchNorm that trains): 8-image batches in parts of at most 3 give the same
    weights and loss as whole batches, and no forward sees more than 3 images."""
    def one_epoch(step_images):
        torch.manual_seed(0)
        model = build_model(LITE0, 2, None, freeze_depth=9)
        split, views, norm = tiny_split(16), TrainViews(32), Normalize((0.5,) * 3, (0.5,) * 3)
        feed = Feed(torch.from_numpy(split.labels),
                    lambda idx: model.frozen_features(norm(views.batch(split.images, idx, 0))), cached=False)
        seen = []
        forward = model.trainable_forward
        model.trainable_forward = lambda x: (seen.append(len(x)), forward(x))[1]
        hp = HParams(lr=0.5, head_lr_mult=1, freeze_depth=9, batch_size=8)
        loss, _ = train_one_epoch(model, build_optimizer(model, hp), feed, 8, step_images)
        return model.head.weight.detach().clone(), loss, seen

    whole_weights, whole_loss, whole_seen = one_epoch(None)
    weights, loss, seen = one_epoch(step)
    assert whole_seen == [8, 8]
    assert seen == ([8, 8] if step is None else [3, 3, 2, 3, 3, 2])
    assert torch.allclose(weights, whole_weights, atol=1e-6) and loss == pytest.approx(whole_loss, rel=1e-6)
    torch.manual_seed(0)
    assert not torch.allclose(weights, build_model(LITE0, 2, None).head.weight, atol=1e-3)  # it did train


def test_every_trial_asks_for_the_step_bound_where_each_slot_holds_it():
    """Identical requests let Ray Tune reuse a finished trial's worker; only where the bound fits."""
    need = footprint.Footprint(base_bytes=footprint.GIB, per_image=(80 * 2**20, 40 * 2**20, 2**20))
    placement = Placement(step_memory_gb=1.25)
    roomy = trial_resources(placement, need, node(16))
    asked = {roomy(config(b, d)).bundles[0]["memory"] for b in (8, 64) for d in (0, 1, 2)}
    assert asked == {2.25 * footprint.GIB}
    # 4 slots x 2.25 GiB > 8 GiB: each trial asks for its own again
    assert trial_resources(placement, need, node(8, cpus=4))(config(8, 2)).bundles[0]["memory"] == 1.25 * footprint.GIB
    # whole batches (no bound): each its own, however much memory there is
    whole = trial_resources(Placement(step_memory_gb=0), need, node(64))
    assert whole(config(8, 2)).bundles[0]["memory"] == 1.25 * footprint.GIB
