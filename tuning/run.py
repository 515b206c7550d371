"""`python -m tuning.run EXPERIMENT`: search fine-tuning hyperparameters, export the best model.

parse -> `tuning.search` (look up experiment, load data once, build Tuner, fit, export) -> print."""
from __future__ import annotations

import time

STARTED = time.time()  # the user's clock (and --time-budget) starts here: the imports below take seconds
if __name__ == "__main__":
    from tuning.lib.allocator import exec_with_jemalloc

    STARTED = exec_with_jemalloc(STARTED)  # the driver computes the probe's features: jemalloc, as trials

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import TYPE_CHECKING, Callable  # noqa: E402

from tuning.app.location import RunLocation, check_name, is_uri  # noqa: E402
from tuning.lib.data.sources import check_folder  # noqa: E402
from tuning.lib.errors import exit_on_usage_error  # noqa: E402

if TYPE_CHECKING:
    from tuning.app.api import SearchResult

# torch, timm, Ray and the rest (tuning.app.api) are imported in main, after a folder:PATH and a
# remote --storage are checked: a typo, a wrong endpoint or bucket is answered in a second, not
# after ~10 s of imports


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
    p.add_argument("--step-memory-gb", type=float, default=1.5, help="activations one CPU training step may keep; a larger batch runs as micro-batches with the same summed gradient (default 1.5; 0 = never split)")
    p.add_argument("--max-failures", type=int, default=2, help="retries of a trial that raised, from its last checkpoint (default 2)")
    p.add_argument("--seed", type=int, help="seed of the Optuna sampler and of training (default 0)")
    p.add_argument("--smoke-test", action="store_true", help="tiny run: 2 samples, 2 epochs, 64 px, 8 images per class")
    p.add_argument("--address", help="join a running Ray cluster (auto, HOST:PORT or ray://HOST:PORT) instead of starting one")
    p.add_argument("--dashboard", action="store_true", help="start Ray's dashboard, on 127.0.0.1 only")
    p.add_argument("--time-budget", metavar="DURATION", help="wall-clock budget of the whole search, e.g. 90s, 10m, 1h: no trial starts that cannot reach its first ASHA rung in time, running ones stop at it, the best epoch found is exported")
    p.add_argument("--warm-start", metavar="RUN_DIR", help="seed the searcher with the finished trials of an earlier run dir (same search space)")
    p.add_argument("--final", default="ensemble", choices=("ensemble", "select", "soup", "best_acc"),
                   help="how the export is made from the trials' best checkpoints and the probe, all calibrated on val: "
                        "ensemble (greedy selection, at most 5 networks), select (one), soup (averaged weights), "
                        "best_acc (highest val_acc, as before) (default: ensemble)")
    p.add_argument("--verbose", action="store_true", help="Ray's and Optuna's own output and progress tables on the console (else they go to RUN_DIR/search.log)")
    return p.parse_args(argv)


def main(
    argv: list[str] | None = None, *, trainable: Callable[..., None] | None = None, started: float | None = None
) -> None:
    """`trainable` replaces `trainables.finetune.finetune` (tests wrap it to inject faults);
    `started`: when the user's clock started (the process start as a command), default now."""
    args = parse(argv)
    if not args.list:
        with exit_on_usage_error("tuning.run"):
            check_folder(args.experiment or "")  # a mistyped folder:PATH is answered before the imports
            if args.name is not None:
                check_name(args.name)
            if is_uri(args.storage or ""):
                RunLocation(args.storage, args.name or "_").check_writable()  # search() checks again, cheaply
    from experiments import EXPERIMENTS
    from tuning.app.api import SearchOptions, search
    from tuning.lib.backbones import BACKBONES
    from tuning.lib.data.sources import FOLDER_PREFIX

    if args.list:
        print("experiments:", ", ".join(EXPERIMENTS.names()), f"(or {FOLDER_PREFIX}PATH, your own folder)")
        print("backbones:  ", ", ".join(BACKBONES.names() + BACKBONES.families()))
        return
    options = {f.name: getattr(args, f.name) for f in dataclasses.fields(SearchOptions)}
    try:
        with exit_on_usage_error("tuning.run"):
            result = search(args.experiment, trainable=trainable, started=started, stop_ray=True, **options)
    except KeyboardInterrupt:  # a second Ctrl-C or SIGTERM, or one outside the trials (tuning.app.interrupts)
        print("tuning.run: interrupted; what was saved stays, and --resume continues a search that had started",
              file=sys.stderr)
        raise SystemExit(130) from None
    print_summary(result)


def print_summary(result: SearchResult) -> None:
    print(f"\nbest hyperparameters: {json.dumps(result.best_config)}")
    print(f"best val_acc: {result.best_val_acc:.4f} (epoch {result.best_epoch}, trial {result.best_trial_id})")
    print(result.final_model)
    if result.test_acc is not None:
        print(f"test_acc: {result.test_acc:.4f}, test NLL {result.test_nll:.4f}, test ECE {result.test_ece:.4f} "
              f"({result.test_images} test images, scored once after the search)")
    print(f"trials: {result.trials}, errored: {len(result.errors)}, wall-clock: {result.wall_s:.0f} s")
    if result.ended_by:
        print(f"ended by {result.ended_by}")
    for trial_id, error in result.errors:
        print(f"  errored: trial {trial_id}: {error}")
    print(f"exported: {result.export_dir} (in {result.export_s:.1f} s)")
    print(f"results: {result.results_file}  (python -m tuning.report {result.run_dir})")
    print(f"tensorboard --logdir {result.run_dir}")
    if result.log_file:
        print(f"log of Ray and Optuna: {result.log_file}")
    sys.stdout.flush()


if __name__ == "__main__":
    main(started=STARTED)
