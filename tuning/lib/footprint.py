"""How much memory a trial needs, so that Ray places big trials beside small ones, not beside each other.

A training step's peak is what autograd saves for the backward pass, and that depends only on the
network, the image size, the freeze depth (frozen stages run under no_grad and save nothing) and
the batch size. So it is measured once per run, in the driver, on two random images per depth
(about a second on CPU for EfficientNet-Lite0 at 224 px), and every trial asks Ray for

    memory = worker base + batch_size x saved bytes per image at its depth.

The estimate is within a few percent of one real step's peak resident memory at every depth
checked (benchmarks/README.md, throughput). On a GPU the activations live in GPU memory, so host
memory is only the base.

A batch whose activations would exceed a step budget (`--step-memory-gb`) is split into
micro-batches whose gradients add up to the batch's (`micro_batches`), so that two full
fine-tunes at batch 64 fit side by side; on CPU smaller steps are no slower (benchmarks/README.md,
throughput).
"""
from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass

import torch

from tuning.lib.files import cache_root, write_atomic
from tuning.lib.model import build_model

GIB = 2**30
# torch and its libraries, the store's pages, Ray's worker: what a Lite0 worker held before its
# first step (benchmarks/README.md, throughput). Parameters, gradients and two optimizer buffers come on top (4 copies).
WORKER_BASE_BYTES = int(0.85 * GIB)
# Ray matches a reused worker to a trial by its exact request: requests rounded up to this step
# let trials of similar size share workers.
STEP_BYTES = GIB // 4


@dataclass(frozen=True)
class Footprint:
    base_bytes: int  # a worker before its first step, parameters and optimizer state included
    per_image: tuple[int, ...]  # bytes autograd saves per training image, by freeze depth
    stage_flops: tuple[int, ...] = ()  # forward FLOPs of each stage, per image (tuning.lib.cost)
    stage_values: tuple[int, ...] = ()  # values each stage outputs, per image; the input's first

    def trial_bytes(
        self, batch_size: int, freeze_depth: int, on_gpu: bool = False, step_images: tuple[int, ...] = ()
    ) -> int:
        """`step_images`: the most images a step may take at each depth (`step_images`), () = any."""
        largest = max(micro_batches(batch_size, step_images[freeze_depth] if step_images else batch_size))
        activations = 0 if on_gpu else largest * self.per_image[freeze_depth]
        return math.ceil((self.base_bytes + activations) / STEP_BYTES) * STEP_BYTES

    def step_images(self, step_bytes: int) -> tuple[int, ...]:
        """The most training images one forward/backward may take at each freeze depth so that
        autograd keeps at most `step_bytes` (at least 2: BatchNorm needs two)."""
        return tuple(max(2, step_bytes // max(per, 1)) for per in self.per_image)


def micro_batches(batch_size: int, most: int) -> list[int]:
    """A batch split into the fewest parts of at most `most` images, as equal as can be; never a
    part of one image (BatchNorm in training needs two), so with `most` 2 a part may hold 3."""
    parts = max(1, min(math.ceil(batch_size / max(most, 1)), batch_size // 2))
    return [batch_size // parts + (1 if i < batch_size % parts else 0) for i in range(parts)]


def saved_bytes_per_image(model: torch.nn.Module, image_size: int, channels: int, images: int = 2) -> int:
    """Bytes of the tensors autograd keeps for the backward pass of one training forward, per image
    (each storage counted once: views of one tensor share it). Parameters that layers keep for
    their backward are the same every step, not per image: they are in the worker's base."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in params:
            storages[storage.data_ptr()] = storage.nbytes()
        return t

    model.train()
    x = torch.zeros(images, channels, image_size, image_size)
    features = model.frozen_features(x)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model.trainable_forward(features)
    return sum(storages.values()) // images


def stage_costs(model: torch.nn.Module, image_size: int, channels: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Forward FLOPs of each stage for one image (torch's FlopCounterMode), and the number of values
    entering the first stage and leaving each one."""
    from torch.utils.flop_counter import FlopCounterMode

    flops, values = [], [channels * image_size * image_size]
    x = model._layout(torch.zeros(1, channels, image_size, image_size).expand(-1, model.in_repeat, -1, -1)
                      if model.in_repeat > 1 else torch.zeros(1, channels, image_size, image_size))
    model.eval()
    with torch.no_grad():
        for stage in model.stages:
            with FlopCounterMode(display=False) as counter:
                x = stage(x)
            flops.append(counter.get_total_flops())
            values.append(x.numel())
    return tuple(flops), tuple(values)


def measure(backbone: str, image_size: int, image_mode: str = "RGB", gray_input: str = "sum") -> Footprint:
    """Measured once per machine and setting (a second or two), then read from the cache root."""
    key = f"{backbone}-{image_size}-{image_mode}-{gray_input}-torch{torch.__version__}".replace("/", "_")
    path = cache_root() / "footprint" / f"{key}.json"
    try:
        saved = json.loads(path.read_text())
        return Footprint(saved["base_bytes"], tuple(saved["per_image"]), tuple(saved["stage_flops"]),
                         tuple(saved["stage_values"]))
    except (OSError, ValueError, KeyError, TypeError):
        pass
    model = build_model(backbone, 2, None, image_mode=image_mode, gray_input=gray_input)
    channels = 1 if image_mode == "L" else 3
    per_image = []
    for depth in range(len(model.stages) + 1):
        model.freeze(depth)
        per_image.append(saved_bytes_per_image(model, image_size, channels))
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    flops, values = stage_costs(model.freeze(0), image_size, channels)
    found = Footprint(WORKER_BASE_BYTES + 4 * params, tuple(per_image), flops, values)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(dataclasses.asdict(found)))
    return found
