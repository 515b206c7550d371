"""From an experiment to a Ray Tune `Tuner`: the Optuna searcher, ASHA, resources and storage."""
from __future__ import annotations

import math
import os
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import optuna
import ray
from ray import tune
from ray.tune.execution.placement_groups import (
    PlacementGroupFactory,
    resource_dict_to_pg_factory,
)
from ray.tune.experiment import Trial
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback
from ray.tune.search.optuna import OptunaSearch

from experiments.base import Experiment
from search_spaces import space_for
from trainables.finetune import finetune
from trainables.inputs import TrialData
from tuning.app.asha import RecipeKeepingASHA
from tuning.app.location import RunLocation
from tuning.app.resuming import ResumableOptunaSearch, search_algorithm
from tuning.app.sampler import DEPTH, CheapFirstTPE
from tuning.app.steering import Steering
from tuning.app.syncing import defer_checkpoint_deletion, tolerate_vanishing_files
from tuning.app.tensorboard import TrialBoard, domains
from tuning.lib import allocator, features, footprint
from tuning.lib import metrics as M
from tuning.lib.cost import epoch_costs
from tuning.lib.data import decoded_store
from tuning.lib.errors import UsageError
from tuning.lib.files import file_digest
from tuning.lib.hparams import HParams


@dataclass(frozen=True)
class Placement:
    """Where a search runs and writes: not part of what is searched."""

    storage: str = "runs"
    name: str | None = None  # default: the experiment's name
    cpus_per_trial: float = 1.0
    gpus_per_trial: float = 0.0
    max_failures: int = 2  # retries of a trial that raised, from its last checkpoint
    feature_cache_gb: float = 4.0  # disk for shared frozen-prefix features, per machine; 0 = off
    memory_gb: float | None = None  # RAM for trials in a Ray started here (None: Ray's default, 70% of free)
    # activations one CPU training step may keep; a larger batch runs as micro-batches (0 = never split).
    # 1.5: a full fine-tune steps 16 images at a time at 224 px, which halves the search's peak
    # memory (benchmarks/README.md, throughput)
    step_memory_gb: float = 1.5
    verbose: bool = False  # Ray's own progress tables instead of our status line

    def location(self, experiment: Experiment) -> RunLocation:
        return RunLocation(self.storage, self.name or experiment.name)


THREAD_TIMEOUT_ENV = "TUNE_FUNCTION_THREAD_TIMEOUT_S"
RAY_ADDRESS_ENV = "RAY_ADDRESS"  # Ray's own: set by `ray job submit`, or by a user for every Ray script


def cluster_address(address: str | None) -> str | None:
    """The cluster to join: `address`, else `$RAY_ADDRESS` as in any Ray script; None starts a Ray here."""
    if address:
        return address
    env = os.environ.get(RAY_ADDRESS_ENV, "")
    return env if env not in ("", "local") else None


def start_ray(
    address: str | None = None, dashboard: bool = False, verbose: bool = False, memory_gb: float | None = None
) -> bool:
    """Join the cluster at `address` (`auto`, `HOST:PORT` or `ray://HOST:PORT`), else start a local
    single-node Ray, unless one is already up (tests); True if this call started or joined it. The
    dashboard stays off unless asked for, and then listens on 127.0.0.1 only. Workers' log lines
    reach the console only with --verbose: errors are kept in each trial's error.txt and listed in
    the summary. `memory_gb` is the memory Ray lets trials take together (tuning.lib.footprint); a
    cluster's nodes state their own. `$RAY_ADDRESS` counts as `address`, as in any Ray script."""
    if ray.is_initialized():
        return False
    joining = cluster_address(address)
    # A reused worker waits this long for the previous trial's thread to end (Ray's default, 2 s, is
    # less than a stopped trial's clean-up takes on a loaded CPU: the next trial then errored with
    # "Trainable runner reuse requires reset_config()"). Workers inherit it from a Ray started here.
    os.environ.setdefault(THREAD_TIMEOUT_ENV, "60")
    if joining:
        try:
            ray.init(address=joining, configure_logging=False, log_to_driver=verbose,
                     runtime_env={"env_vars": {THREAD_TIMEOUT_ENV: os.environ[THREAD_TIMEOUT_ENV]}})
        except (ConnectionError, RuntimeError, ValueError) as err:
            named = joining if address else f"{joining} (${RAY_ADDRESS_ENV})"
            raise UsageError(f"cannot join the Ray cluster at {named}: {str(err).splitlines()[0]}") from None
        return True
    memory = {"_memory": int(memory_gb * footprint.GIB)} if memory_gb is not None else {}
    # No idle workers started ahead: every trial is an actor, which Ray gives a worker of its own,
    # so prestarted ones only cost a CPU-second each while the probe is being fitted. Workers train
    # with jemalloc (tuning.lib.allocator); a cluster's nodes keep their own environment. "local":
    # a bare ray.init() joins the cluster that `ray start` (or ray.cluster_utils) last recorded on
    # this machine, and then refuses _system_config with a traceback; `--address auto` joins that one.
    with allocator.preloaded_children():
        ray.init(address="local", include_dashboard=dashboard, dashboard_host="127.0.0.1", configure_logging=False,
                 log_to_driver=verbose, _system_config={"prestart_worker_first_driver": False}, **memory)
    return True


def stop_ray_meanwhile() -> threading.Thread:
    """Stop Ray (or leave the cluster) in the background: its processes take seconds to exit, and
    what follows the trials (choosing, exporting, scoring the final model) needs no Ray. The caller
    joins the thread before it returns."""
    stopping = threading.Thread(target=ray.shutdown, name="ray-shutdown")
    stopping.start()
    return stopping


def check_resources(placement: Placement) -> int:
    """How many trials fit side by side; impossible requests are the user's error."""
    total = ray.cluster_resources()
    cpus, gpus = total.get("CPU", 0.0), total.get("GPU", 0.0)
    if placement.cpus_per_trial <= 0 or placement.cpus_per_trial > cpus:
        raise UsageError(f"--cpus-per-trial {placement.cpus_per_trial:g} must be in (0, {cpus:g}], the CPUs Ray sees")
    if placement.gpus_per_trial < 0:
        raise UsageError("--gpus-per-trial must not be negative")
    if placement.gpus_per_trial > gpus:
        raise UsageError(f"--gpus-per-trial {placement.gpus_per_trial:g} but Ray sees {gpus:g} GPU(s)")
    slots = math.floor(cpus / placement.cpus_per_trial + 1e-9)
    if placement.gpus_per_trial > 0:
        slots = min(slots, math.floor(gpus / placement.gpus_per_trial + 1e-9))
    return max(1, slots)


def trial_dirname(trial: "Trial") -> str:
    return f"trial_{trial.trial_id}"


def feature_cache(
    experiment: Experiment, placement: Placement, handle: decoded_store.StoreHandle, weights: Path | None
) -> features.FeatureCache | None:
    """Frozen stages are shared only when every trial's are the same pretrained weights."""
    if placement.feature_cache_gb <= 0 or weights is None:
        return None
    identity = {
        "store": handle.key, "backbone": experiment.backbone, "weights": file_digest(weights),
        "image_size": experiment.image_size, "image_mode": experiment.image_mode,
        "gray_input": experiment.gray_input, "crop_scale": list(experiment.crop_scale),
        "hflip": experiment.hflip, "seed": experiment.seed,
    }
    return features.FeatureCache(features.namespace(**identity), int(placement.feature_cache_gb * 2**30))


def make_trainable(
    experiment: Experiment, placement: Placement, handle: decoded_store.StoreHandle, weights: Path | None,
    trainable: Callable[..., None] = finetune, head_init: dict | None = None,
) -> tune.Trainable:
    """`trainable` is `finetune` but for tests, which wrap it (to inject faults, say); `head_init`
    is the linear probe's head, every trial's starting point."""
    nodes = [n for n in ray.nodes() if n.get("Alive")]
    need = footprint.measure(experiment.backbone, experiment.image_size, experiment.image_mode, experiment.gray_input)
    cache = feature_cache(experiment, placement, handle, weights)
    if cache is not None:
        cache.check()  # once, here: a trial's warning would only reach its log
    sizes = {name: len(split) for name, split in handle.open().splits.items()}
    costs = epoch_costs(need, sizes["train"], sizes["val"], cache is not None)
    steps = step_images(placement, need)
    data = TrialData(decoded_store.share(handle, len(nodes) > 1), cache, costs, steps)
    return tune.with_resources(
        tune.with_parameters(
            trainable, experiment=experiment, data=data, weights=str(weights) if weights else None,
            head_init=head_init,
        ),
        trial_resources(placement, need, nodes),
    )


def step_images(placement: Placement, need: footprint.Footprint) -> tuple[int, ...]:
    """The most images per training step at each depth: on CPU what `step_memory_gb` holds; on a
    GPU the activations are not in host memory (and the GPU's own memory is Ray's fraction), so
    batches stay whole."""
    if placement.gpus_per_trial > 0 or placement.step_memory_gb <= 0:
        return ()
    return need.step_images(int(placement.step_memory_gb * footprint.GIB))


def trial_resources(
    placement: Placement, need: footprint.Footprint, nodes: list[dict]
) -> Callable[[dict], PlacementGroupFactory]:
    """Each trial asks for the memory its batch size and freeze depth need, so two full fine-tunes
    at batch 64 (about 6 GB each at 224 px, unsplit) do not run side by side where that does not
    fit, while a frozen trial still can beside one. A trial larger than any node runs alone on the
    largest. A batch split into micro-batches (`step_images`) asks for its largest micro-batch's.

    Where the step budget bounds every trial and each node holds that bound once per trial slot,
    every trial asks for the bound instead: memory cannot run short, and identical requests let
    Ray Tune hand a finished trial's worker to the next (it reuses actors only for an identical
    request, and a new worker costs seconds; benchmarks/README.md, throughput)."""
    on_gpu = placement.gpus_per_trial > 0
    steps = step_images(placement, need)
    largest_node = max(n.get("Resources", {}).get("memory", 0.0) for n in nodes)
    bound = uniform_request(placement, need, nodes, steps)

    def resources(config: dict) -> PlacementGroupFactory:
        hp = HParams.from_config(config)
        memory = bound or need.trial_bytes(hp.batch_size, hp.freeze_depth, on_gpu, steps)
        return resource_dict_to_pg_factory(
            {"cpu": placement.cpus_per_trial, "gpu": placement.gpus_per_trial, "memory": min(memory, largest_node)}
        )

    return resources


def uniform_request(placement: Placement, need: footprint.Footprint, nodes: list[dict], steps: tuple[int, ...]) -> int | None:
    """The most memory any trial can need, if every node fits it in each of its trial slots; else
    None. Without a step bound (GPU, or whole batches) a trial asks for its own: on a GPU that is
    the worker's base for every trial anyway."""
    if not steps:
        return None
    bound = max(need.trial_bytes(most, depth, False, steps) for depth, most in enumerate(steps))
    for node in nodes:
        have = node.get("Resources", {})
        if have.get("CPU", 0) < placement.cpus_per_trial:
            continue
        slots = math.floor(have["CPU"] / placement.cpus_per_trial + 1e-9)
        if slots * bound > have.get("memory", 0.0):
            return None
    return bound


def make_searcher(experiment: Experiment, storage: "optuna.storages.BaseStorage | None" = None) -> OptunaSearch:
    """TPE seeded by --seed, its start-up trials cheap first (tuning.app.sampler); the seeds' hand
    recipe is enqueued as the first trial. `storage`: a study seeded with an earlier run's trials
    (--warm-start, tuning.app.warmstart)."""
    return ResumableOptunaSearch(
        space=space_for(experiment),
        metric=M.OBJECTIVE,
        mode=M.MODE,
        sampler=CheapFirstTPE(seed=experiment.seed, recipe_depth=experiment.recipe.get(DEPTH)),
        points_to_evaluate=[dict(experiment.recipe)],
        storage=storage,
    )


def allow_checkpoint_per_epoch() -> None:
    """One checkpoint kept per trial forces a state snapshot at each report; Ray warns about that
    on every epoch, which is the intended behaviour here."""
    os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
    tolerate_vanishing_files()  # one snapshot per epoch makes Ray's syncing race likely (tuning.app.syncing)
    defer_checkpoint_deletion()  # and a kill between a deletion and the next snapshot's copy more likely


def make_scheduler(experiment: Experiment) -> RecipeKeepingASHA:
    """ASHA on compute spent, not epochs: a shallow trial is judged after the compute a deep one
    spends in many epochs (tuning.lib.cost). Counted, so the same on a busy machine, and
    restart-proof, unlike training_iteration. A trial reports at a rung inside an epoch
    (tuning.lib.cost.rung_pauses). A trial ends at its last epoch or at `epochs` full fine-tuning
    epochs of compute, whichever comes first, or on a plateau; the seeds' recipe is exempt from
    the rungs (tuning.app.asha)."""
    return RecipeKeepingASHA(
        experiment=experiment,
        time_attr=M.COST,
        metric=M.OBJECTIVE,
        mode=M.MODE,
        max_t=experiment.epochs,
        grace_period=experiment.grace_period,
        reduction_factor=experiment.reduction_factor,
    )


def build_tuner(
    experiment: Experiment, placement: Placement, trainable: tune.Trainable, steering: Steering | None = None
) -> tune.Tuner:
    scheduler = make_scheduler(experiment)
    location = placement.location(experiment)
    steering = steering or Steering()
    allow_checkpoint_per_epoch()
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            # OptunaSearch would otherwise keep one trial pending at a time (field notes)
            search_alg=search_algorithm(steering.searcher(make_searcher(experiment, steering.warm), experiment),
                                        max_concurrent=check_resources(placement)),
            scheduler=scheduler,
            num_samples=experiment.samples,
            reuse_actors=True,  # a new trial skips the worker start-up and re-imports
            trial_dirname_creator=trial_dirname,
        ),
        run_config=tune.RunConfig(
            name=location.name,
            storage_path=location.ray_storage,
            checkpoint_config=tune.CheckpointConfig(
                num_to_keep=1,  # the best epoch's; Ray also keeps the latest for restarts
                checkpoint_score_attribute=M.OBJECTIVE,
                checkpoint_score_order=M.MODE,
            ),
            failure_config=tune.FailureConfig(max_failures=placement.max_failures),
            callbacks=callbacks(experiment, placement, steering),
            stop=steering.stopper(),
            verbose=None if placement.verbose else 0,
        ),
    )


def callbacks(experiment: Experiment, placement: Placement, steering: Steering) -> list[tune.Callback]:
    # our TensorBoard writer instead of Ray's TBXLoggerCallback, which Ray would add back unless told
    os.environ["TUNE_DISABLE_AUTO_CALLBACK_LOGGERS"] = "1"
    loggers: list[tune.Callback] = [CSVLoggerCallback(), JsonLoggerCallback(), TrialBoard(domains(space_for(experiment)))]
    if placement.verbose:
        return loggers
    return [*loggers, steering.progress(experiment)]


def restore_tuner(run_dir: str, trainable: tune.Trainable) -> tune.Tuner:
    """Continue an interrupted search with its own OptunaSearch state (not a fresh searcher):
    finished trials stay finished, unfinished ones continue from their last checkpoint, and trials
    that errored get their retries again."""
    allow_checkpoint_per_epoch()
    if not tune.Tuner.can_restore(run_dir):
        raise UsageError(f"{run_dir} holds no search state to resume")
    return tune.Tuner.restore(run_dir, trainable=trainable, resume_unfinished=True, resume_errored=True)
