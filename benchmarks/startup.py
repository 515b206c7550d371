"""How soon the first trial trains, and the floor under it on this machine.

Each arm runs in its own child process, so each pays its own imports:
- command: `python -m tuning.run EXPERIMENT --samples 2 --epochs 1`, cold (a fresh
  TUNING_CACHE_DIR) then warm (the same one again): seconds from the command's start to the linear
  probe and to each trial function's start (its first report's timestamp less time_this_iter_s);
- driver: what the command does before it asks Ray for a trial, phase by phase (imports, weights
  and decoding, the probe), cold then warm, in wall seconds and CPU seconds (every thread's);
- ray-floor: `ray.init` and a Tuner whose trial function does nothing but report: the soonest any
  Ray Tune trial starts here. That function then imports the trainable (torch, torchvision, timm),
  as every trial's new worker process must, and reports the seconds and CPU seconds that took.
The first trial cannot start before the driver's CPU work, Ray's and the worker's imports are done
on the CPUs there are: `floor` in the output adds them up.

    python -m benchmarks.startup --data-root ../shared/datasets [--repeats 2]

Prints one line per arm and run and writes benchmarks/results/startup.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.anytime import versions
from benchmarks.search import HERE, commit


def cpu_seconds() -> float:
    """This process's CPU time (all its threads) and that of the children it has waited for."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def driver_arm(experiment_name: str, data_root: str, started: float) -> dict:
    """Child process: the command's own steps before Ray, timed one by one."""
    t, c = [time.time() - started], [cpu_seconds()]
    import io

    import tuning.run  # noqa: F401  (everything the command imports)
    from experiments import EXPERIMENTS
    from tuning.app import probing
    from tuning.app.api import load_data, resolve_weights
    from tuning.app.search import Placement, feature_cache

    t.append(time.time() - started), c.append(cpu_seconds())
    experiment = EXPERIMENTS.get(experiment_name)
    weights = resolve_weights(experiment, None)
    handle, data = load_data(experiment, data_root, io.StringIO())
    t.append(time.time() - started), c.append(cpu_seconds())
    probing.fit(experiment, data, weights, feature_cache(experiment, Placement(), handle, weights))
    t.append(time.time() - started), c.append(cpu_seconds())
    phases = ("imports", "weights_and_decoding", "probe")
    return {"ends_s": dict(zip(phases, (round(x, 2) for x in t[1:]))),
            "cpu_s": {p: round(c[i + 1] - c[i], 2) for i, p in enumerate(phases)}}


def floor_arm(started: float) -> dict:
    """Child process: the soonest Ray Tune starts a trial here, and what the trial's imports cost."""
    import ray
    from ray import tune

    imported_cpu = cpu_seconds()  # the command's driver imports Ray too: counted there
    ray.init(address="local", include_dashboard=False, configure_logging=False, log_to_driver=False)
    ray_ready = time.time() - started

    def trial(config: dict) -> None:
        begun, cpu = time.time(), cpu_seconds()
        import trainables.finetune  # noqa: F401  (torch, torchvision, timm, as a real trial's worker)

        tune.report({"trial_starts_s": begun - config["started"], "imports_s": time.time() - begun,
                     "imports_cpu_s": cpu_seconds() - cpu, "worker_cpu_before_s": cpu})

    with tempfile.TemporaryDirectory(prefix="tuning-bench-startup-") as storage:
        grid = tune.Tuner(trial, param_space={"started": started},
                          run_config=tune.RunConfig(storage_path=storage, verbose=0)).fit()
    m = grid[0].metrics
    return {"ray_ready_s": round(ray_ready, 2), "trial_starts_s": round(m["trial_starts_s"], 2),
            "worker_cpu_before_trial_s": round(m["worker_cpu_before_s"], 2),
            "trial_imports_s": round(m["imports_s"], 2), "trial_imports_cpu_s": round(m["imports_cpu_s"], 2),
            # Ray's start and the Tuner, in the driver and the Ray daemons it has reaped: a lower bound
            "ray_cpu_s_counted": round(cpu_seconds() - imported_cpu, 2)}


def child(arm: str, args: argparse.Namespace, env: dict[str, str]) -> dict:
    """Runs `arm` in a fresh interpreter; its last stdout line is its JSON."""
    started = time.time()
    cmd = [sys.executable, "-m", "benchmarks.startup", "--arm", arm, "--experiment", args.experiment,
           "--data-root", str(args.data_root), "--started", repr(started)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"{arm} failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def command_arm(args: argparse.Namespace, env: dict[str, str], storage: Path) -> dict:
    import pandas as pd

    started = time.time()
    proc = subprocess.run([sys.executable, "-m", "tuning.run", args.experiment, "--samples", "2", "--epochs", "1",
                           "--seed", "0", "--data-root", str(args.data_root), "--storage", str(storage)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"tuning.run failed ({proc.returncode}): {proc.stderr.strip().splitlines()[-1:]}")
    starts = []
    for progress in (storage / args.experiment).glob("trial_*/progress.csv"):
        frame = pd.read_csv(progress)
        starts.append(round(float(frame["timestamp"].iloc[0] - frame["time_this_iter_s"].iloc[0]) - started, 1))
    probe = json.loads((storage / args.experiment / "probe.json").read_text())
    wall = re.findall(r"wall-clock: (\d+) s", proc.stdout)
    return {"trial_function_starts_s": sorted(starts), "probe_known_s": round(probe["timestamp"] - started, 1),
            "wall_s": int(wall[-1]) if wall else None}


def measure(args: argparse.Namespace, work: Path) -> list[dict]:
    """Each repeat: the command cold, then warm on the cache it left; the driver's phases cold, then
    warm; Ray's floor. All caches and run dirs go under `work`, not the machine's cache root."""
    env = {**os.environ, "PYTHONPATH": f"{HERE.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    runs = []
    for repeat in range(args.repeats):
        run: dict = {"repeat": repeat}
        for kind in ("cold", "warm"):  # warm: the same cache again (decoded store, features, probe inputs)
            cache_env = {**env, "TUNING_CACHE_DIR": str(work / f"cache-{repeat}")}
            run[f"command_{kind}"] = command_arm(args, cache_env, work / f"run-{repeat}-{kind}")
            print(f"run {repeat} command {kind}: {run[f'command_{kind}']}", flush=True)
        for kind in ("cold", "warm"):
            run[f"driver_{kind}"] = child("driver", args, {**env, "TUNING_CACHE_DIR": str(work / f"driver-{repeat}")})
            print(f"run {repeat} driver {kind}: {run[f'driver_{kind}']}", flush=True)
        floor = run["ray_floor"] = child("ray-floor", args, env)
        print(f"run {repeat} ray floor: {floor}", flush=True)
        cpus = os.cpu_count() or 1
        for kind in ("cold", "warm"):
            driver = run[f"driver_{kind}"]
            work_s = (sum(driver["cpu_s"].values()) + floor["ray_cpu_s_counted"]  # one trial worker's start and imports:
                      + floor["worker_cpu_before_trial_s"] + floor["trial_imports_cpu_s"])
            run[f"floor_{kind}_s"] = round(max(work_s / cpus, floor["trial_starts_s"] + floor["trial_imports_s"]), 1)
        print(f"run {repeat} floor: first trial trains no sooner than {run['floor_cold_s']} s cold, "
              f"{run['floor_warm_s']} s warm ({cpus} CPUs)", flush=True)
        runs.append(run)
    return runs


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--experiment", default="hymenoptera")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--out", type=Path, default=HERE / "results" / "startup.json")
    p.add_argument("--arm", help=argparse.SUPPRESS)  # internal: a child process's arm
    p.add_argument("--started", type=float, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm == "driver":
        return print(json.dumps(driver_arm(args.experiment, str(args.data_root), args.started)))
    if args.arm == "ray-floor":
        return print(json.dumps(floor_arm(args.started)))
    with tempfile.TemporaryDirectory(prefix="tuning-bench-startup-") as tmp:  # 2 GB of caches and run dirs
        runs = measure(args, Path(tmp))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"experiment": args.experiment, "commit": commit(), "versions": versions(),
                                    "runs": runs}, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
