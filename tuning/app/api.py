"""The Python API: `tuning.search(experiment, **overrides)` runs what `python -m tuning.run` runs
and returns a `SearchResult`; `tuning.load(export_dir)` gives a predictor from an export alone.

The CLI is a thin layer on `search`: the same options by the flags' names, the same one-line
errors (`UsageError`, which the CLI prints and exits 2 on). Ray is started once per process and
reused by later calls."""
from __future__ import annotations

import dataclasses
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, TextIO

import numpy as np
import pandas as pd
import torch

from experiments import Experiment, get_experiment
from trainables.finetune import finetune
from tuning.app import final_model, probing, results
from tuning.app.budget import Budget, parse_duration
from tuning.app.console import LOG_FILE, quiet
from tuning.app.export import Best, export, find_best, score_on_test
from tuning.app.interrupts import stop_signals
from tuning.app.location import RunLocation, check_name
from tuning.app.predictor import Predictor, load
from tuning.app.rundir import (
    SPEC_FILE,
    check_run_dir,
    check_same_experiment,
    check_storage,
    prune_unknown_trials,
    run_dir_writes,
    save_spec,
)
from tuning.app.steering import Steering
from tuning.app.syncing import flush_deletions
from tuning.app.tensorboard import write_export_images
from tuning.app.warmstart import warm_storage
from tuning.app.search import (
    Placement,
    build_tuner,
    check_resources,
    cluster_address,
    feature_cache,
    make_trainable,
    restore_tuner,
    start_ray,
    stop_ray_meanwhile,
)
from tuning.lib.allocator import release_memory
from tuning.lib.backbones import BACKBONES
from tuning.lib.data import decoded_store
from tuning.lib.data.decode import Dataset
from tuning.lib.data.fetch import resolve_data_root
from tuning.lib.data.listing import Listing
from tuning.lib.data.sources import create_source
from tuning.lib import metrics as M
from tuning.lib.data.transforms import Normalize, eval_batch, resize_for
from tuning.lib.errors import UsageError
from tuning.lib import footprint
from tuning.lib.model import FineTuneNet, build_model

# --smoke-test: the whole pipeline in about a minute on a 2-core CPU. Explicit options still win.
SMOKE = {"samples": 2, "epochs": 2, "image_size": 64, "per_class": 8}


@dataclass(frozen=True)
class SearchOptions:
    """Every option of a search, named as the CLI's flags (`--data-root` is `data_root`)."""

    samples: int | None = None  # None: the experiment's
    epochs: int | None = None
    backbone: str | None = None
    weights: Path | str | None = None
    no_pretrained: bool = False
    seed: int | None = None
    smoke_test: bool = False
    data_root: str | None = None
    storage: str = "runs"
    name: str | None = None
    resume: bool = False
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    feature_cache_gb: float = 4.0
    memory_gb: float | None = None
    step_memory_gb: float = 1.5
    max_failures: int = 2
    address: str | None = None
    dashboard: bool = False
    verbose: bool = False
    time_budget: str | float | None = None  # "90s", "10m", "1h", or seconds
    warm_start: str | Path | None = None  # an earlier run dir whose trials seed the searcher
    final: str = final_model.DEFAULT_METHOD  # how the export is made from the candidates (tuning.app.final_model)

    @classmethod
    def of(cls, overrides: dict[str, Any]) -> "SearchOptions":
        valid = [f.name for f in dataclasses.fields(cls)]
        unknown = sorted(set(overrides) - set(valid))
        if unknown:
            raise UsageError(f"unknown option {unknown[0]!r}; valid: {', '.join(valid)}")
        return cls(**overrides)


@dataclass
class SearchResult:
    best_config: dict[str, Any]
    best_val_acc: float
    best_epoch: int | float  # 1.333: the report at an ASHA rung a third into epoch 2
    best_trial_id: str
    test_acc: float | None
    test_images: int | None
    export_dir: Path
    run_dir: str
    results_file: str
    trials: int
    errors: list[tuple[str, str]] = field(default_factory=list)  # (trial id, last line of its error)
    wall_s: float = 0.0
    ended_by: str | None = None  # why the search ended before --samples trials ran (the time budget, Ctrl-C)
    log_file: str | None = None  # what Ray and Optuna said (the console shows only our lines)
    final_model: str = ""  # one line: what was exported (a trial, a soup or an ensemble) and its val scores
    test_nll: float | None = None
    test_ece: float | None = None
    export_s: float = 0.0  # writing the export (model.pt, ONNX, plain), after the final model is chosen

    @property
    def results(self) -> pd.DataFrame:
        """results.parquet: one row per trial."""
        return pd.read_parquet(Path(self.run_dir) / results.RESULTS_FILE) if "://" not in self.run_dir \
            else pd.read_parquet(self.results_file)

    def predictor(self) -> Predictor:
        return load(self.export_dir)

    def predict(self, paths: list[str | Path]) -> list[tuple[str, float]]:
        """(label, probability) per image, from the exported model."""
        return self.predictor().predict(paths)


def configure(spec: str | Experiment | None, options: SearchOptions) -> tuple[Experiment, Placement]:
    if spec is None or spec == "":
        from experiments import EXPERIMENTS

        raise UsageError(f"name an experiment: {', '.join(EXPERIMENTS.names())}")
    experiment = spec if isinstance(spec, Experiment) else get_experiment(spec)
    overrides: dict[str, Any] = dict(SMOKE) if options.smoke_test else {}
    explicit = {"samples": options.samples, "epochs": options.epochs, "backbone": options.backbone, "seed": options.seed}
    overrides.update({k: v for k, v in explicit.items() if v is not None})
    if options.no_pretrained:
        overrides["pretrained"] = False
    experiment = dataclasses.replace(experiment, **overrides)
    BACKBONES.get(experiment.backbone)
    for flag in ("samples", "epochs"):
        if getattr(experiment, flag) <= 0:
            raise UsageError(f"--{flag} must be a positive integer, got {getattr(experiment, flag)}")
    if options.name is not None:
        check_name(options.name)
    if options.max_failures < 0:
        raise UsageError("--max-failures must not be negative")
    if options.feature_cache_gb < 0:
        raise UsageError("--feature-cache-gb must not be negative")
    if options.memory_gb is not None and options.memory_gb <= 0:
        raise UsageError(f"--memory-gb must be positive, got {options.memory_gb:g}")
    if options.final not in final_model.METHODS:
        raise UsageError(f"--final must be one of {', '.join(final_model.METHODS)}, got {options.final!r}")
    if options.step_memory_gb < 0:
        raise UsageError(f"--step-memory-gb must not be negative, got {options.step_memory_gb:g}")
    if options.memory_gb is not None and cluster_address(options.address):
        raise UsageError("--memory-gb sizes a Ray started here; on a cluster, start each node with `ray start --memory BYTES`")
    placement = Placement(
        storage=options.storage, name=options.name, cpus_per_trial=options.cpus_per_trial,
        gpus_per_trial=options.gpus_per_trial, max_failures=options.max_failures, verbose=options.verbose,
        feature_cache_gb=options.feature_cache_gb, memory_gb=options.memory_gb,
        step_memory_gb=options.step_memory_gb,
    )
    return experiment, placement


def resolve_weights(experiment: Experiment, weights: Path | None) -> Path | None:
    """Find and check the pretrained weights in the driver, so a bad file fails before any trial."""
    if not experiment.pretrained:
        return None
    path = weights or BACKBONES.get(experiment.backbone).default_weights()
    build_model(experiment.backbone, 2, path)  # raises UsageError if the file does not fit
    return path.resolve()


def list_data(experiment: Experiment, data_root: str | None) -> Listing:
    """The dataset's files and splits; raises UsageError for missing or malformed data."""
    source = create_source(experiment.dataset)
    return source.list(resolve_data_root(data_root), seed=experiment.seed, per_class=experiment.per_class)


def load_data(
    experiment: Experiment, data_root: str | None, out: TextIO | None = None, listing: Listing | None = None
) -> tuple[decoded_store.StoreHandle, Dataset]:
    """List the dataset (unless `listing` is given), then decode it into the store unless this
    machine already has it."""
    listing = listing if listing is not None else list_data(experiment, data_root)
    handle = decoded_store.build(listing, resize_for(experiment.image_size), experiment.image_mode)
    data = handle.open()
    print(f"data: {', '.join(f'{k} {len(v)}' for k, v in data.splits.items())} images, "
          f"classes {data.classes}", file=out or sys.stdout, flush=True)
    return handle, data


@dataclass
class Prepared:
    weights: Path | None
    handle: decoded_store.StoreHandle
    data: Dataset
    probe: probing.ProbeResult
    probe_model: Any


def prepare(
    experiment: Experiment, placement: Placement, options: SearchOptions, started: float, console: TextIO,
    listing: Listing,
) -> Prepared:
    """Everything before the first trial that needs no Ray: weights, data, the linear probe (the
    search's first result and every trial's starting head, tuning.app.probing)."""
    weights = resolve_weights(experiment, Path(options.weights) if options.weights else None)
    handle, data = load_data(experiment, options.data_root, console, listing)
    probe, model = probing.fit(experiment, data, weights, feature_cache(experiment, placement, handle, weights))
    print(f"linear probe: val_acc {probe.probe.val_acc:.4f} (val_loss {probe.probe.val_loss:.4f}, "
          f"l2 {probe.probe.l2:g}{', standardised features' if probe.probe.standardized else ''}), {time.time() - started:.0f} s after start", file=console, flush=True)
    return Prepared(weights, handle, data, probe, model)


def search(
    experiment: str | Experiment, *, trainable: Callable[..., None] | None = None, started: float | None = None,
    stop_ray: bool = False, **overrides: Any,
) -> SearchResult:
    """Search, export the best epoch of the best trial, score it on the test split, write results.

    `experiment`: a registered name, `folder:PATH`, or an `Experiment`. `overrides`: the CLI's
    flags by name (`samples=`, `epochs=`, `seed=`, `storage=`, `name=`, `data_root=`,
    `smoke_test=True`, ...). `trainable` replaces `trainables.finetune.finetune` (tests wrap it).
    `started`: `time.time()` when the user's clock started (the command passes its process start,
    so `time_budget` and the reported times include its imports); default: now. `stop_ray`: a Ray
    this search started (or a cluster it joined) stops while the final model is made, as the
    command does, its process ending with the search; by default it stays up for the next search
    in this process (a notebook). Raises `UsageError` for anything the user can fix."""
    started = time.time() if started is None else started
    options = SearchOptions.of(overrides)
    budget = Budget(parse_duration(options.time_budget), started) if options.time_budget is not None else None
    experiment, placement = configure(experiment, options)
    if options.warm_start and options.resume:
        raise UsageError("--warm-start seeds a new search; --resume continues one: pass one of them")
    if budget is not None and options.resume:
        raise UsageError("--time-budget bounds a new search; a resumed one runs to its --samples")
    location = placement.location(experiment)
    check_storage(location)
    check_run_dir(location, options.resume)
    if options.resume:
        check_same_experiment(location.local, experiment)
    listing = list_data(experiment, options.data_root)  # missing data is said in a second, not after Ray's start and stop
    with quiet(location.local / LOG_FILE, options.verbose) as console:
        warm = warm_storage(options.warm_start, experiment)[0] if options.warm_start else None
        # Ray starts (mostly waiting on its processes) while the data is decoded and the probe fitted
        with ThreadPoolExecutor(max_workers=1) as pool:
            preparing = pool.submit(prepare, experiment, placement, options, started, console, listing)
            try:
                started_ray = start_ray(options.address, options.dashboard, options.verbose, placement.memory_gb)
            finally:
                ready = preparing.result()
        with stop_signals() as signals:  # Ctrl-C and SIGTERM: the trials stop, the best so far is exported
            check_resources(placement)
            handle, data, weights, probe = ready.handle, ready.data, ready.weights, ready.probe
            with run_dir_writes(location, searched=False):
                if not options.resume:
                    save_spec(location.local, experiment, data.classes)
                    location.push(SPEC_FILE)
                probing.save(probe, ready.probe_model, location.local)
                location.push(probing.PROBE_FILE, probing.PROBE_DIR)
            # saved: the driver keeps no network through the search, and hands the probe's heap back
            ready.probe_model = None
            release_memory()
            wrapped = make_trainable(experiment, placement, handle, weights, trainable or finetune, probing.head_of(probe))
            if options.resume:
                prune_unknown_trials(location)
                tuner = restore_tuner(location.uri, wrapped)
            else:
                tuner = build_tuner(experiment, placement, wrapped, Steering(budget, warm, console))
            with signals.fit():
                grid = tuner.fit()
            # Ray's processes take seconds to stop: the command's stop overlaps what follows, which needs no Ray
            stopping = stop_ray_meanwhile() if stop_ray and started_ray else None
            flush_deletions()  # the checkpoints Ray let go, kept until a trial list without them was stored
            # the probe is a result too: a budget that ends before any trial's first epoch still exports it
            floor = Best(probing.PROBE_ID, probe.config, probe.metrics, str(location.local / probing.PROBE_DIR))
            best = find_best(grid, floor)
            final = choose_final(grid, probe, data, experiment, location.local, options.final)
            test = data.splits.get("test")
            with run_dir_writes(location, searched=True):
                exporting = time.perf_counter()
                export_dir = export(final, experiment, data.classes, location.local)
                export_s = time.perf_counter() - exporting
                final_model.save_record(final, final.candidates, location.local)
                tested = score_on_test(export_dir, test) if test is not None else {}
                lead = final.lead
                images_dir = probing.PROBE_DIR if lead.is_probe else f"trial_{lead.trial_id}"
                write_export_images(location.local / images_dir, export_dir, data.splits["val"], final.val_predicted())
                location.push("best", images_dir, final_model.FINAL_FILE)
                table = results.write(location)
    del ready  # the probe's network and the driver's decoded views: a notebook runs search again
    release_memory()
    if stopping is not None:
        stopping.join()
    if budget is not None and budget.ended(len(grid), experiment.samples):
        ended_by = f"the time budget ({options.time_budget}): {len(grid)} of {experiment.samples} trials started"
    else:
        ended_by = signals.stopped_by(len(grid), experiment.samples)
    errors = [(r.path.rsplit("_", 1)[-1], str(r.error).strip().splitlines()[-1][:200]) for r in grid if r.error is not None]
    return SearchResult(
        best_config=dict(best.config), best_val_acc=float(best.metrics["val_acc"]), best_epoch=results.epoch_number(best.metrics["epoch"]),
        best_trial_id=best.trial_id, test_acc=tested.get(M.TEST_ACC), test_images=len(test) if test is not None else None,
        export_dir=export_dir, run_dir=location.uri, results_file=table, trials=len(grid), errors=errors,
        wall_s=time.time() - started, ended_by=ended_by,
        log_file=None if options.verbose else str(location.local / LOG_FILE),
        final_model=final.describe(), test_nll=tested.get("test_nll"), test_ece=tested.get("test_ece"),
        export_s=export_s,
    )


def choose_final(grid: Any, probe: probing.ProbeResult, data: Dataset, experiment: Experiment, run_dir: Path,
                 method: str) -> final_model.Final:
    """The export, from every trial's kept checkpoints and the probe (tuning.app.final_model)."""
    candidates = final_model.gather(grid, final_model.probe_candidate(probe, run_dir, probing.PROBE_ID, probing.PROBE_DIR))
    labels = np.asarray(data.splits["val"].labels)
    soup = soup_data(experiment, data) if method == "soup" else None
    final = final_model.choose(candidates, labels, method, soup)
    final.candidates = candidates
    if experiment.hflip:  # trained on mirrored views: the final model averages each image with its mirror
        started = time.perf_counter()
        build, val_x = (soup.build, soup.val_x) if soup is not None else network_and_val(experiment, data)
        final_model.mirror(final, labels, build, val_x)
        final.seconds += time.perf_counter() - started
    # measured once per machine and kept (tuning.lib.footprint): here a cache read
    need = footprint.measure(experiment.backbone, experiment.image_size, experiment.image_mode, experiment.gray_input)
    final.relative_cost = final_model.prediction_cost(final, need.stage_flops)
    return final


def network_and_val(experiment: Experiment, data: Dataset) -> tuple[Callable[[], FineTuneNet], torch.Tensor]:
    """The experiment's network (random head, unfrozen), to load a candidate's state into, and
    val's normalised centre crops, as the trials evaluate them."""
    spec = BACKBONES.get(experiment.backbone)
    norm = Normalize.for_mode(spec.mean, spec.std, experiment.image_mode)
    return (lambda: build_model(experiment.backbone, len(data.classes), None, image_mode=experiment.image_mode,
                                gray_input=experiment.gray_input),
            norm(eval_batch(data.splits["val"].images, experiment.image_size)))


def soup_data(experiment: Experiment, data: Dataset) -> final_model.SoupData:
    """A soup's images: normalised centre crops of val, and of evenly spaced training images."""
    spec = BACKBONES.get(experiment.backbone)
    norm = Normalize.for_mode(spec.mean, spec.std, experiment.image_mode)
    train = data.splits["train"]
    picked = np.linspace(0, len(train) - 1, min(len(train), final_model.BN_IMAGES)).round().astype(int)
    build, val_x = network_and_val(experiment, data)
    return final_model.SoupData(
        build=build, train_x=norm(eval_batch([train.images[i] for i in picked], experiment.image_size)), val_x=val_x)


__all__ = ["RunLocation", "SearchOptions", "SearchResult", "UsageError", "load", "search"]
