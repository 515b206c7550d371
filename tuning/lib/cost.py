"""What an epoch costs at each freeze depth, in full fine-tuning epochs: the fidelity ASHA judges
trials by, so an expensive shallow trial is compared with a cheap deep one after the same
compute, not after the same number of epochs.

It is counted, not timed (the same on a busy machine as on an idle one): a training image costs
three forward passes of the trainable stages (forward, and backward's two), a validation image
one; the frozen prefix costs a forward pass per image only where it is not read from the shared
feature cache. Stage FLOPs come from `tuning.lib.footprint.stage_costs`."""
from __future__ import annotations

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
