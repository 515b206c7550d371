"""What might lift the best val_acc past the search's ceiling: fixed configurations trained outside
Ray under variants of the training, each from the linear probe's head, every report's val score.

- crop_scale: the training views' RandomResizedCrop scale (the seeds' 0.08-1, and milder ones),
  for random configurations from the search space at freeze depths 9, 8 and 7;
- batchnorm: the trainable stages' BatchNorm in train mode (as the seeds) or kept in eval mode
  with its ImageNet statistics (Keras' advice for fine-tuning EfficientNet), at shallow depths and
  small learning rates (LP-FT's full fine-tuning), reported every half epoch;
- eval_crop: the probe on centre crops of 0.8, 0.875 (the default, 224 of 256) and 1.0 of the
  shorter side.
Scores are images right out of the val split, so a change of one is one image.

    python -m benchmarks.variants --data-root ../shared/datasets [--parts crop_scale,batchnorm,eval_crop]

Prints a line per configuration and writes benchmarks/results/variants.json.
"""
from __future__ import annotations

import argparse
import dataclasses
import io
import json
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np
import optuna
import torch

from benchmarks.anytime import versions
from benchmarks.search import HERE, commit
from experiments import EXPERIMENTS
from experiments.base import Experiment
from search_spaces import SEARCH_SPACES
from trainables.finetune import build_optimizer, train_one_epoch
from trainables.inputs import TrialInputs
from tuning.app import probing
from tuning.app.api import load_data, resolve_weights
from tuning.lib.backbones import BACKBONES
from tuning.lib.checkpoint import evaluate
from tuning.lib.data.transforms import Normalize, as_tensor
from tuning.lib.features import FeatureCache, namespace
from tuning.lib.hparams import HParams
from tuning.lib.model import FineTuneNet, build_model
from tuning.lib.probe import fit_probe

# LP-FT-style full or nearly full fine-tuning at small learning rates, and the seeds' recipe
SHALLOW = (
    {"optimizer": "sgd", "lr": 1e-3, "head_lr_mult": 10.0, "freeze_depth": 0},
    {"optimizer": "sgd", "lr": 3e-4, "head_lr_mult": 1.0, "freeze_depth": 0},
    {"optimizer": "adam", "lr": 1e-5, "head_lr_mult": 1.0, "freeze_depth": 0},
    {"optimizer": "adam", "lr": 1e-4, "head_lr_mult": 1.0, "freeze_depth": 0},
    {"optimizer": "sgd", "lr": 3e-3, "head_lr_mult": 1.0, "freeze_depth": 2},
    {"optimizer": "sgd", "lr": 1e-3, "head_lr_mult": 1.0, "freeze_depth": 3},
    {"optimizer": "adam", "lr": 3e-5, "head_lr_mult": 1.0, "freeze_depth": 3},
    {"optimizer": "adam", "lr": 1e-4, "head_lr_mult": 3.0, "freeze_depth": 4},
)


class FrozenBatchNormNet(FineTuneNet):
    """Every BatchNorm in eval mode, also in the trainable stages (its affine weights still train)."""

    def train(self, mode: bool = True) -> "FrozenBatchNormNet":
        super().train(mode)
        for module in self.modules():
            if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self


@dataclasses.dataclass
class Setup:
    experiment: Experiment
    data: object
    weights: Path
    cache: FeatureCache
    head: dict


def setup(experiment: Experiment, data_root: str, cache_key: str, features_root: Path) -> Setup:
    """The decoded store is the machine's, shared with real searches; the frozen features of these
    variants (views under other crop scales) are the benchmark's own, in `features_root`."""
    weights = resolve_weights(experiment, None)
    handle, data = load_data(experiment, data_root, io.StringIO())
    cache = FeatureCache(namespace(bench="variants", key=cache_key, store=handle.key), 8 * 2**30, str(features_root))
    probe, _ = probing.fit(experiment, data, weights, cache)
    return Setup(experiment, data, weights, cache, probing.head_of(probe))


def train(s: Setup, config: dict, epochs: int, half_epochs: bool = False, frozen_bn: bool = False) -> list[int]:
    """Correct val images after every epoch (and every half epoch): the trainable's steps, no Ray."""
    exp, spec = s.experiment, BACKBONES.get(s.experiment.backbone)
    config = {"weight_decay": 1e-6, "batch_size": 32, **config}
    hp = HParams.from_config(config)
    seed = exp.seed + zlib.crc32(json.dumps(config, sort_keys=True).encode())
    torch.manual_seed(seed)
    model = build_model(exp.backbone, len(s.data.classes), s.weights, hp.freeze_depth)
    if frozen_bn:
        model.__class__ = FrozenBatchNormNet
    model.head.load_state_dict({k: torch.tensor(v) for k, v in s.head.items()})
    optimizer = build_optimizer(model, hp)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=epochs)
    inputs = TrialInputs(s.data, exp, model, Normalize.for_mode(spec.mean, spec.std, exp.image_mode), s.cache,
                         torch.device("cpu"))
    val = inputs.val()
    scores: list[int] = []

    def report(*_: object) -> None:
        scores.append(round(evaluate(model, val)[1] * len(val)))
        model.train()

    half = len(s.data.splits["train"].labels) // hp.batch_size // 2
    for epoch in range(epochs):
        torch.manual_seed(seed + epoch)
        train_one_epoch(model, optimizer, inputs.train(epoch), hp.batch_size,
                        pauses=(half,) if half_epochs else (), pause=report)
        schedule.step()
        report()
    return scores


def random_configs(experiment: Experiment, count: int, depths: tuple[int, ...]) -> list[dict]:
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    num_stages = BACKBONES.get(experiment.backbone).num_stages
    configs = []
    for i in range(count):
        trial = study.ask()
        SEARCH_SPACES.get(experiment.search_space)(trial, num_stages=num_stages)
        configs.append({**trial.params, "freeze_depth": depths[i % len(depths)]})
    return configs


def summary(rows: list[dict]) -> dict:
    scores = np.array([r["scores"] for r in rows])
    return {"mean_best": round(float(scores.max(1).mean()), 2), "mean_last": round(float(scores[:, -1].mean()), 2),
            "max": int(scores.max())}


def crop_scale(args: argparse.Namespace, base: Experiment) -> dict:
    configs = random_configs(base, 12, (9, 8, 7))
    out = {}
    for scale in ((0.08, 1.0), (0.35, 1.0), (0.6, 1.0)):
        exp = dataclasses.replace(base, crop_scale=scale)
        s = setup(exp, args.data_root, f"crop{scale}", args.features)
        rows = [{"config": c, "scores": train(s, c, exp.epochs)} for c in configs]
        for r in rows:
            print(f"crop_scale {scale}: {r['config']} {r['scores']}", flush=True)
        out[f"{scale[0]}-{scale[1]}"] = {"rows": rows, **summary(rows)}
        print(f"crop_scale {scale}: {summary(rows)}", flush=True)
    return out


def batchnorm(args: argparse.Namespace, base: Experiment) -> dict:
    exp = dataclasses.replace(base, epochs=4)
    s = setup(exp, args.data_root, "base", args.features)
    out = {}
    for mode in ("train", "frozen"):
        rows = [{"config": c, "scores": train(s, c, exp.epochs, half_epochs=True, frozen_bn=mode == "frozen")}
                for c in SHALLOW]
        for r in rows:
            print(f"batchnorm {mode}: {r['config']} {r['scores']}", flush=True)
        out[mode] = {"rows": rows, **summary(rows)}
        print(f"batchnorm {mode}: {summary(rows)}", flush=True)
    return out


def eval_crop(args: argparse.Namespace, base: Experiment) -> dict:
    from torchvision.transforms import v2

    s = setup(base, args.data_root, "base", args.features)
    spec = BACKBONES.get(base.backbone)
    model = build_model(base.backbone, len(s.data.classes), s.weights, spec.num_stages).eval()
    norm = Normalize.for_mode(spec.mean, spec.std, base.image_mode)
    size = base.image_size

    def features(split: str, fraction: float) -> torch.Tensor:
        out = []
        images = s.data.splits[split].images
        for i in range(0, len(images), 32):
            crops = []
            for array in images[i : i + 32]:
                chw = as_tensor(array).permute(2, 0, 1)
                scale = round(size / fraction) / min(chw.shape[1:])
                chw = v2.functional.resize(chw, [max(size, round(d * scale)) for d in chw.shape[1:]], antialias=True)
                crops.append(v2.functional.center_crop(chw, [size, size]))
            out.append(model.frozen_features(norm(torch.stack(crops))).float())
        return torch.cat(out)

    labels = {k: torch.as_tensor(np.asarray(s.data.splits[k].labels)) for k in ("train", "val")}
    out = {}
    for fraction in (0.8, 0.875, 1.0):
        probe = fit_probe(features("train", fraction), labels["train"], features("val", fraction), labels["val"],
                          len(s.data.classes))
        out[str(fraction)] = {"probe_correct": round(probe.val_acc * len(labels["val"])), "val_loss": round(probe.val_loss, 4),
                              "l2": probe.l2}
        print(f"eval_crop {fraction}: {out[str(fraction)]}", flush=True)
    return out


PARTS = {"crop_scale": crop_scale, "batchnorm": batchnorm, "eval_crop": eval_crop}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", required=True)
    p.add_argument("--experiment", default="hymenoptera")
    p.add_argument("--parts", default=",".join(PARTS))
    p.add_argument("--out", type=Path, default=HERE / "results" / "variants.json")
    args = p.parse_args()
    base = EXPERIMENTS.get(args.experiment)
    result = {"experiment": args.experiment, "commit": commit(), "versions": versions()}
    with tempfile.TemporaryDirectory(prefix="tuning-bench-variants-") as tmp:
        args.features = Path(tmp)
        for part in args.parts.split(","):
            started = time.time()
            result[part] = PARTS[part](args, base)
            result[part]["seconds"] = round(time.time() - started)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
