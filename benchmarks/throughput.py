"""Training throughput: our trainable's epoch against a bare loop written like the seeds.

Ours: images decoded once into the memory-mapped store, fixed views cropped from uint8 tensors, and
the frozen prefix read from the feature cache (trainables.inputs + trainables.finetune). Two
numbers: "cold", the first trial at a depth, which computes the cache entry inside its epoch; and
"shared", every later trial at that depth in that epoch, which reads it. Seeds: torchvision
ImageFolder + DataLoader decoding JPEGs every epoch, full forward pass, the same model (in PyTorch's
default NCHW layout, as the seeds run it; ours runs channels_last), batch size, freeze depth and threads.

    python -m benchmarks.throughput --data-root ../shared/datasets [--threads 2] [--epochs 1]

Prints a table and writes benchmarks/results/throughput.json.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torchvision
from torch import nn
from torchvision import transforms

from benchmarks.search import commit
from experiments import EXPERIMENTS
from trainables.finetune import build_optimizer, train_one_epoch
from trainables.inputs import TrialInputs
from tuning.lib.backbones import BACKBONES
from tuning.lib.data import decoded_store as store
from tuning.lib.data.sources import DATASETS
from tuning.lib.data.transforms import Normalize, resize_for
from tuning.lib.features import FeatureCache
from tuning.lib.hparams import HParams
from tuning.lib.model import build_model


def seeds_epoch(model: nn.Module, folder: Path, hp: HParams, size: int, mean, std) -> float:
    """The tutorial's loop: ImageFolder + DataLoader, decode and transform every image every epoch."""
    tf = transforms.Compose([transforms.RandomResizedCrop(size), transforms.RandomHorizontalFlip(),
                             transforms.ToTensor(), transforms.Normalize(mean, std)])
    loader = torch.utils.data.DataLoader(torchvision.datasets.ImageFolder(folder, tf),
                                         batch_size=hp.batch_size, shuffle=True, num_workers=0)
    optimizer = build_optimizer(model, hp)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    seen, start = 0, time.perf_counter()
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        optimizer.step()
        seen += len(y)
    return seen / (time.perf_counter() - start)


def warm_up(model: nn.Module, batch_size: int, size: int) -> None:
    """One untimed step, so neither arm pays oneDNN's first-call set-up inside its timing."""
    x = torch.randn(batch_size, 3, size, size)
    model.train()
    model(x).sum().backward()
    model.zero_grad(set_to_none=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--cache", type=Path, default=Path("/tmp/tuning-bench-cache"), help="store and feature cache dir")
    p.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "throughput.json")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    experiment = EXPERIMENTS.get("hymenoptera")
    spec = BACKBONES.get(experiment.backbone)
    weights = spec.default_weights()
    size = experiment.image_size
    decode_start = time.perf_counter()
    listing = DATASETS.get(experiment.dataset).list(args.data_root)
    handle = store.build(listing, resize_for(size), experiment.image_mode, root=args.cache)
    decode_s = time.perf_counter() - decode_start
    data = handle.open()
    train = data.splits["train"]
    folder = args.data_root / DATASETS.get(experiment.dataset).dirname / "train"
    norm = Normalize(spec.mean, spec.std)
    rows = []
    for depth in (0, spec.num_stages // 2, spec.num_stages):
        hp = HParams(lr=1e-3, head_lr_mult=10, freeze_depth=depth, batch_size=args.batch_size)
        cache = FeatureCache(f"bench-{time.time_ns()}", 8 * 2**30, root=str(args.cache / "features"))
        ours = {}
        for phase in ("cold", "shared"):
            torch.manual_seed(0)
            model = build_model(experiment.backbone, len(data.classes), weights, depth)
            warm_up(model, hp.batch_size, size)
            inputs = TrialInputs(data, experiment, model, norm, cache, torch.device("cpu"))
            start = time.perf_counter()  # the epoch as a trial sees it: cache lookup/fill included
            feed = inputs.train(0)
            train_one_epoch(model, build_optimizer(model, hp), feed, hp.batch_size)
            ours[phase] = len(train) / (time.perf_counter() - start)
        torch.manual_seed(0)
        model = build_model(experiment.backbone, len(data.classes), weights, depth, channels_last=False)  # as the seeds
        warm_up(model, hp.batch_size, size)
        seeds = seeds_epoch(model, folder, hp, size, spec.mean, spec.std)
        rows.append({"freeze_depth": depth, "ours_cold_img_s": ours["cold"], "ours_shared_img_s": ours["shared"],
                     "seeds_img_s": seeds, "ratio_cold": ours["cold"] / seeds, "ratio_shared": ours["shared"] / seeds})
        print(f"freeze_depth {depth:>2}: ours cold {ours['cold']:7.2f} img/s  shared {ours['shared']:8.2f} img/s   "
              f"seeds {seeds:6.2f} img/s   ratio cold {ours['cold'] / seeds:5.2f}  shared {ours['shared'] / seeds:6.2f}",
              flush=True)
    result = {"commit": commit(), "backbone": experiment.backbone, "image_size": size, "threads": args.threads, "torch": torch.__version__,
              "batch_size": args.batch_size, "train_images": len(train),
              "decode_once_s": decode_s, "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
