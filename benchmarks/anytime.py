"""Best-so-far val_acc against wall-clock: our search against a plain, tutorial-style Ray Tune search.

What a user waits for is the best model found so far, from the moment the command starts. Both
arms run as child processes on the same data, samples, epochs and seed, one after the other:
- ours: `python -m tuning.run EXPERIMENT` with a cold cache (a fresh TUNING_CACHE_DIR), so
  decoding, the linear probe and every feature computation are in its time;
- tutorial: OptunaSearch (the recipe first) and epoch-based ASHA (grace 1, reduction 3) over the
  seeds' loop (`benchmarks/tutorial_trainable.py`: ImageFolder + DataLoader decoding JPEGs every
  epoch, a full forward pass every step, a random head), as a Ray Tune user would write it.
Every reported val_acc (and our probe's) is placed at its time since the child started.

    python -m benchmarks.anytime --data-root ../shared/datasets [--runs 8x3:0,8x3:1,8x3:2,32x8:0]

Prints a table per run and writes benchmarks/results/anytime.json and anytime.png.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pandas as pd

from benchmarks.search import HERE, commit, tree_pss, versions

ARMS = ("ours", "tutorial")


def plain_search(args: argparse.Namespace) -> None:
    """Child process: the tutorial-style arm, built only from Ray Tune's and Optuna's own parts."""
    import dataclasses

    from benchmarks.tutorial_trainable import tutorial_tuner
    from experiments import EXPERIMENTS
    from tuning.app.search import start_ray

    experiment = dataclasses.replace(EXPERIMENTS.get(args.experiment), samples=args.samples, seed=args.seed,
                                     epochs=args.epochs)
    start_ray()
    tuner = tutorial_tuner(experiment, args.storage, data_root=args.data_root)
    grid = tuner.fit()
    best = max(r.metrics.get("best_val_acc", 0.0) for r in grid if r.metrics)
    print(f"trials: {len(grid)}, errored: {len(grid.errors)}\nbest val_acc: {best:.4f}")


def events(run_dir: Path) -> list[tuple[float, float]]:
    """(unix time, val_acc) of every report in a run dir, and of our linear probe."""
    found = []
    for progress in run_dir.glob("*/progress.csv"):  # ours: trial_ID/, Ray's default: NAME_ID_.../
        frame = pd.read_csv(progress)
        if "val_acc" in frame and "timestamp" in frame:
            found += list(zip(frame["timestamp"].astype(float), frame["val_acc"].astype(float)))
    probe = run_dir / "probe.json"
    if probe.is_file():
        record = json.loads(probe.read_text())
        found.append((record["timestamp"], record["metrics"]["val_acc"]))
    return sorted(found)


def best_so_far(found: list[tuple[float, float]], start: float) -> list[tuple[float, float]]:
    curve, best = [], -1.0
    for when, value in found:
        if value > best:
            best = value
            curve.append((round(when - start, 1), value))
    return curve


def run_child(cmd: list[str], env: dict[str, str], log: Path) -> tuple[float, float, float]:
    """Start time (unix), wall seconds, peak PSS of the process tree in GB."""
    peak = [0]
    start, t0 = time.time(), time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)

        def sample() -> None:
            while proc.poll() is None:
                peak[0] = max(peak[0], sum(tree_pss(proc.pid).values()))
                time.sleep(1.0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        proc.wait()
        sampler.join()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    return start, time.perf_counter() - t0, peak[0] / 2**30


def run_pair(args: argparse.Namespace, out: dict, arms: list[str], work: Path) -> dict:
    """Runs `arms` of the run `out` (samples, epochs, seed) and puts them into it beside any arm an
    earlier invocation measured; each arm records the commit and versions it ran with."""
    samples, epochs, seed = out["samples"], out["epochs"], out["seed"]
    env = {**os.environ, "PYTHONPATH": f"{HERE.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    for arm in arms:
        storage = work / f"{samples}x{epochs}-s{seed}-{arm}"
        common = ["--samples", str(samples), "--epochs", str(epochs), "--seed", str(seed),
                  "--data-root", str(args.data_root), "--storage", str(storage)]
        cmd = ([sys.executable, "-m", "tuning.run", args.experiment, *common, "--name", "ours"] if arm == "ours" else
               [sys.executable, "-m", "benchmarks.anytime", "--arm", "tutorial", "--experiment", args.experiment, *common])
        arm_env = {**env, "TUNING_CACHE_DIR": str(storage / "cache")}  # cold: nothing decoded or cached yet
        measured = commit()  # now: the tree may change while a long arm runs
        start, wall, peak = run_child(cmd, arm_env, storage.with_suffix(".log"))
        curve = best_so_far(events(storage / ("ours" if arm == "ours" else "tutorial")), start)
        out[arm] = {"wall_s": round(wall, 1), "peak_pss_gb": round(peak, 2), "final_best": curve[-1][1] if curve else None,
                    "commit": measured, "versions": versions(), "curve": curve}
        print(f"  {arm:>8}: {wall:6.0f} s, best val_acc {out[arm]['final_best']:.4f}, peak {peak:.1f} GB", flush=True)
    if set(ARMS) <= out.keys():
        target = out["tutorial"]["final_best"]
        reached = next((t for t, v in out["ours"]["curve"] if v >= target), None)
        out["ours_reaches_tutorial_best_s"] = reached
        out["ratio_of_tutorial_total"] = round(reached / out["tutorial"]["wall_s"], 3) if reached is not None else None
        out["meets_fifth"] = reached is not None and reached <= out["tutorial"]["wall_s"] / 5
        out["ours_at_least_tutorial"] = out["ours"]["final_best"] >= target
        print(f"  ours reached the tutorial-style final best {target:.4f} at "
              f"{reached if reached is not None else 'never'} s ({out['ratio_of_tutorial_total']} of its total)", flush=True)
    return out


def plot(runs: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.8), squeeze=False)
    for ax, run in zip(axes[0], runs):
        for arm, colour in (("ours", "tab:blue"), ("tutorial", "tab:orange")):
            if arm not in run or not run[arm]["curve"]:
                continue
            t, v = zip(*run[arm]["curve"])
            ax.step([*t, run[arm]["wall_s"]], [*v, v[-1]], where="post", color=colour, label=f"{arm} ({run[arm]['wall_s']:.0f} s)")
            ax.plot(t, v, "o", color=colour, ms=3)
        ax.set(title=f"{run['samples']} x {run['epochs']}, seed {run['seed']}", xlabel="seconds since start",
               ylabel="best val_acc so far")
        ax.set_xscale("symlog", linthresh=10)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--experiment", default="hymenoptera")
    p.add_argument("--runs", default="8x3:0,8x3:1,8x3:2,32x8:0",
                   help="SAMPLESxEPOCHS:SEED[:ARM+ARM], comma-separated (arms: ours, tutorial; default both)")
    p.add_argument("--storage", default=None, help="run dirs (default: a fresh temporary dir)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "anytime.json")
    p.add_argument("--fresh", action="store_true", help="drop the runs already in --out instead of keeping them")
    p.add_argument("--arm", help=argparse.SUPPRESS)  # internal: the tutorial arm's child process
    p.add_argument("--samples", type=int, help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.arm == "tutorial":
        return plain_search(args)
    work = Path(args.storage or tempfile.mkdtemp(prefix="tuning-bench-anytime-"))
    work.mkdir(parents=True, exist_ok=True)
    # runs measured earlier stay (a 32x8 pair alone takes most of an hour here); a run given again is replaced
    runs = json.loads(args.out.read_text())["runs"] if args.out.is_file() and not args.fresh else []
    for spec in args.runs.split(","):
        size, seed, *arms = spec.split(":")
        samples, epochs = (int(v) for v in size.split("x"))
        key = {"samples": samples, "epochs": epochs, "seed": int(seed)}
        run = next((r for r in runs if {k: r[k] for k in key} == key), None)
        if run is None:
            run = dict(key)
            runs.append(run)
        print(f"{samples} samples x {epochs} epochs, seed {seed}:", flush=True)
        run_pair(args, run, arms[0].split("+") if arms else list(ARMS), work)
        runs.sort(key=lambda r: (r["samples"] * r["epochs"], r["seed"]))
        summary = {"experiment": args.experiment, "runs": runs}
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(summary, indent=2))  # after every run: a long benchmark keeps what it measured
        plot(runs, args.out.with_suffix(".png"))
    print(f"wrote {args.out} and {args.out.with_suffix('.png')}")


if __name__ == "__main__":
    main()
