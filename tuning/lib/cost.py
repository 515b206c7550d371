"""What an epoch costs at each freeze depth, in full fine-tuning epochs: the fidelity ASHA judges
trials by, so an expensive shallow trial is compared with a cheap deep one after the same
compute, not after the same number of epochs.

It is counted, not timed (the same on a busy machine as on an idle one): a training image costs
three forward passes of the trainable stages (forward, and backward's two), a validation image
one; the frozen prefix costs a forward pass per image only where it is not read from the shared
feature cache. Stage FLOPs come from `tuning.lib.footprint.stage_costs`."""
from __future__ import annotations

import math

from tuning.lib.footprint import Footprint


def prefix_cached(footprint: Footprint, depth: int, cache_on: bool) -> bool:
    """The rule `trainables.inputs` follows: a prefix is cached unless it outputs more values than it takes in."""
    return cache_on and depth > 0 and footprint.stage_values[depth] <= footprint.stage_values[0]


def epoch_costs(footprint: Footprint, n_train: int, n_val: int, cache_on: bool) -> tuple[float, ...]:
    """One epoch's cost at each freeze depth 0..num_stages, relative to a full fine-tuning epoch."""
    flops = footprint.stage_flops

    def cost(depth: int) -> float:
        trainable = sum(flops[depth:])
        prefix = 0 if prefix_cached(footprint, depth, cache_on) else sum(flops[:depth])
        return n_train * (3 * trainable + prefix) + n_val * (trainable + prefix)

    full = cost(0)
    return tuple(cost(d) / full for d in range(len(flops) + 1))


def rungs(grace_period: float, reduction_factor: float, max_t: float) -> list[float]:
    """ASHA's milestones, in cost, lowest first: as Ray's `ASHAScheduler` derives them (one bracket)."""
    count = int(math.log(max_t / grace_period) / math.log(reduction_factor) + 1)
    return [grace_period * reduction_factor**k for k in range(count)]


def steps_per_epoch(images: int, batch_size: int) -> int:
    """Optimizer steps in an epoch (`trainables.finetune.train_one_epoch` takes them from here): a
    ragged tail of one image is dropped, as a batch of one breaks BatchNorm."""
    steps = math.ceil(images / batch_size)
    return steps - 1 if steps > 1 and images % batch_size == 1 else steps


def rung_pauses(epoch_cost: float, epoch: int, milestones: list[float], steps: int) -> list[int]:
    """After how many of epoch `epoch`'s (0-based) `steps` a trial reports, because an ASHA rung
    falls inside that epoch: so an expensive shallow trial is judged when it has spent a rung's
    compute, not at the end of the epoch that crosses it. A depth-1 trial on EfficientNet-Lite0
    (0.98 of a full epoch each) meets the first rung, 1/3, a third into its first epoch, and the
    second, 1, one step into its second. Each pause is the first step at or past its rung."""
    if epoch_cost <= 0:
        return []
    pauses = set()
    for milestone in milestones:
        inside = milestone / epoch_cost - epoch
        if not 0 < inside < 1:
            continue
        k = math.ceil(inside * steps - 1e-9)
        while k < steps and (epoch + k / steps) * epoch_cost < milestone:
            k += 1  # float rounding must not leave a report just short of its rung
        if 0 < k < steps:
            pauses.add(k)
    return sorted(pauses)
