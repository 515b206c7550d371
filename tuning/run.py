"""`python -m tuning.run EXPERIMENT`: search fine-tuning hyperparameters, export the best model.

parse -> look up experiment -> load data once -> build Tuner -> fit -> export -> print."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path


from experiments import EXPERIMENTS, Experiment
from experiments.folder import folder_experiment
from tuning import datasets, results, store
from tuning.backbones import BACKBONES
from tuning.errors import UsageError, exit_on_usage_error
from tuning.export import export, find_best, score_on_test
from tuning.images import resize_for
from tuning.model import build_model
from tuning.rundir import (
    SPEC_FILE, check_run_dir, check_same_experiment, check_storage, prune_unknown_trials, save_spec,
)
from tuning.search import Placement, build_tuner, check_resources, make_trainable, restore_tuner, start_ray

# --smoke-test: the whole pipeline in about a minute on a 2-core CPU. Explicit flags still win.
SMOKE = {"samples": 2, "epochs": 2, "image_size": 64, "per_class": 8}


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="tuning.run", description=__doc__.split("\n")[0])
    p.add_argument("experiment", nargs="?", help="experiment name (see --list)")
    p.add_argument("--list", action="store_true", help="list experiments and backbones, then exit")
    p.add_argument("--samples", type=int, help="number of trials (default: the experiment's, 32)")
    p.add_argument("--epochs", type=int, help="max epochs per trial; ASHA stops weak trials sooner")
    p.add_argument("--backbone", help="pretrained network (default: efficientnet_lite0)")
    p.add_argument("--weights", type=Path, help="ImageNet state dict for the backbone (else package/hub cache/download)")
    p.add_argument("--no-pretrained", action="store_true", help="train from random weights (never implied)")
    p.add_argument("--data-root", help="folder holding the datasets (default: $TUNING_DATA_ROOT, else ./data)")
    p.add_argument("--storage", default="runs", help="where run dirs go: a path or a URI pyarrow takes, s3://, gs://, ... (default: ./runs)")
    p.add_argument("--name", help="run dir name under --storage (default: the experiment's name)")
    p.add_argument("--resume", action="store_true", help="continue the interrupted search in the run dir")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial, fractions allowed (default 1)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0, help="GPUs per trial, fractions pack trials on one GPU (default 0)")
    p.add_argument("--feature-cache-gb", type=float, default=4.0, help="disk for frozen-layer features shared by trials, per machine (default 4; 0 = off)")
    p.add_argument("--memory-gb", type=float, help="RAM that trials may take together on this machine; each asks for what its batch size and freeze depth need (default: Ray's, 70%% of free memory)")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a trial that raised, from its last checkpoint (default 2)")
    p.add_argument("--seed", type=int, help="seed of the Optuna sampler and of training (default 0)")
    p.add_argument("--smoke-test", action="store_true", help="tiny run: 2 samples, 2 epochs, 64 px, 8 images per class")
    p.add_argument("--address", help="join a running Ray cluster (auto, HOST:PORT or ray://HOST:PORT) instead of starting one")
    p.add_argument("--dashboard", action="store_true", help="start Ray's dashboard, on 127.0.0.1 only")
    p.add_argument("--verbose", action="store_true", help="Ray's full progress tables and logs instead of one status line")
    return p.parse_args(argv)


def configure(args: argparse.Namespace) -> tuple[Experiment, Placement]:
    if not args.experiment:
        raise UsageError(f"name an experiment: {', '.join(EXPERIMENTS.names())}")
    if args.experiment.startswith(datasets.FOLDER_PREFIX):
        experiment = folder_experiment(args.experiment)
    else:
        experiment = EXPERIMENTS.get(args.experiment)
    overrides = dict(SMOKE) if args.smoke_test else {}
    explicit = {"samples": args.samples, "epochs": args.epochs, "backbone": args.backbone, "seed": args.seed}
    overrides.update({k: v for k, v in explicit.items() if v is not None})
    if args.no_pretrained:
        overrides["pretrained"] = False
    experiment = dataclasses.replace(experiment, **overrides)
    BACKBONES.get(experiment.backbone)
    for flag in ("samples", "epochs"):
        if getattr(experiment, flag) <= 0:
            raise UsageError(f"--{flag} must be a positive integer, got {getattr(experiment, flag)}")
    if args.max_failures < 0:
        raise UsageError("--max-failures must not be negative")
    if args.feature_cache_gb < 0:
        raise UsageError("--feature-cache-gb must not be negative")
    if args.memory_gb is not None and args.memory_gb <= 0:
        raise UsageError(f"--memory-gb must be positive, got {args.memory_gb:g}")
    if args.memory_gb is not None and args.address:
        raise UsageError("--memory-gb sizes a Ray started here; on a cluster, start each node with `ray start --memory BYTES`")
    placement = Placement(
        storage=args.storage, name=args.name, cpus_per_trial=args.cpus_per_trial,
        gpus_per_trial=args.gpus_per_trial, max_failures=args.max_failures, verbose=args.verbose,
        feature_cache_gb=args.feature_cache_gb, memory_gb=args.memory_gb,
    )
    return experiment, placement


def resolve_weights(experiment: Experiment, weights: Path | None) -> Path | None:
    """Find and check the pretrained weights in the driver, so a bad file fails before any trial."""
    if not experiment.pretrained:
        return None
    path = weights or BACKBONES.get(experiment.backbone).default_weights()
    build_model(experiment.backbone, 2, path)  # raises UsageError if the file does not fit
    return path.resolve()


def load_data(experiment: Experiment, data_root: str | None) -> tuple[store.StoreHandle, datasets.Dataset]:
    """List the dataset, then decode it into the store unless this machine already has it."""
    source = datasets.create_source(experiment.dataset)
    listing = source.list(datasets.resolve_data_root(data_root), seed=experiment.seed, per_class=experiment.per_class)
    handle = store.build(listing, resize_for(experiment.image_size), experiment.image_mode)
    data = handle.open()
    print(f"data: {', '.join(f'{k} {len(v)}' for k, v in data.splits.items())} images, "
          f"classes {data.classes}", flush=True)
    return handle, data


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.list:
        print("experiments:", ", ".join(EXPERIMENTS.names()), f"(or {datasets.FOLDER_PREFIX}PATH, your own folder)")
        print("backbones:  ", ", ".join(BACKBONES.names()))
        return
    started = time.time()
    with exit_on_usage_error("tuning.run"):
        experiment, placement = configure(args)
        location = placement.location(experiment)
        check_storage(location)
        check_run_dir(location, args.resume)
        if args.resume:
            check_same_experiment(location.local, experiment)
        weights = resolve_weights(experiment, args.weights)
        handle, data = load_data(experiment, args.data_root)
        start_ray(args.address, args.dashboard, args.verbose, placement.memory_gb)
        check_resources(placement)
        trainable = make_trainable(experiment, placement, handle, weights)
        if args.resume:
            prune_unknown_trials(location)
            tuner = restore_tuner(location.uri, trainable)
        else:
            save_spec(location.local, experiment, data.classes)
            location.push(SPEC_FILE)
            tuner = build_tuner(experiment, placement, trainable)
        grid = tuner.fit()
        best = find_best(grid)
        export_dir = export(best, experiment, data.classes, location.local)
        test = data.splits.get("test")
        test_acc = score_on_test(export_dir, test) if test is not None else None
        location.push("best")
        table = results.write(location)
    print_summary(grid, best, export_dir, table, location.uri, time.time() - started,
                  (test_acc, len(test)) if test is not None else None)


def print_summary(
    grid, best, export_dir: Path, table: str, run_dir: str, wall_s: float, test: tuple[float, int] | None = None
) -> None:
    print(f"\nbest hyperparameters: {json.dumps(best.config)}")
    print(f"best val_acc: {best.metrics['val_acc']:.4f} (epoch {best.metrics['epoch']}, trial {best.trial_id})")
    if test is not None:
        print(f"test_acc: {test[0]:.4f} ({test[1]} test images, scored once after the search)")
    print(f"trials: {len(grid)}, errored: {len(grid.errors)}, wall-clock: {wall_s:.0f} s")
    for result in grid:
        if result.error is not None:
            print(f"  errored: trial {result.path.rsplit('_', 1)[-1]}: {str(result.error).strip().splitlines()[-1][:200]}")
    print(f"exported: {export_dir}")
    print(f"results: {table}  (python -m tuning.report {run_dir})")
    print(f"tensorboard --logdir {run_dir}")
    sys.stdout.flush()


if __name__ == "__main__":
    main()
