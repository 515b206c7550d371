"""The whole search, ours against a tutorial-style trainable, in one invocation.

Both arms run the same experiment (same seed, search space, ASHA settings, samples, CPUs per trial)
through the same Tuner (`tuning.app.search.build_tuner`); only the trainable differs:
- ours: `python -m tuning.run EXPERIMENT` itself (decode-once store, shared frozen features, export),
  started with an empty cache dir, so decoding and every feature computation are in its time;
- tutorial: torchvision ImageFolder + DataLoader decoding the JPEGs every epoch, a full forward
  pass every step, no caches: the seeds' loop inside a Ray Tune trainable.

    python -m benchmarks.search --data-root ../shared/datasets [--samples 32] [--arms ours,tutorial]

`glibc` is a third arm: ours with glibc's malloc instead of jemalloc (`TUNING_JEMALLOC=0`).
`--code NAME=DIR` adds an arm NAME: ours with the code in DIR (a git worktree of another commit or
of a change under test), its commit recorded. An arm named twice runs twice
(`--arms ours,glibc,ours,glibc`, reported as ours#2, glibc#2).

Each arm is a child process; its wall-clock and peak memory (the sum of PSS over the process and
all its descendants, Ray's workers included, sampled every second) are measured from outside.
Prints a table and writes benchmarks/results/search.json.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def tree_pss(root: int) -> dict[str, int]:
    """Proportional set size of each process in a tree, by process (`pid name`): shared pages (the
    mapped store, torch's libraries) are split between the processes that map them instead of
    being counted once per process."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, stack = {}, [root]
    while stack:
        pid = stack.pop()
        stack += children.get(pid, [])
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                name = f.read().replace(b"\0", b" ").decode(errors="replace")[:60].strip()
            with open(f"/proc/{pid}/smaps_rollup") as f:
                found[f"{pid} {name}"] = sum(int(line.split()[1]) * 1024 for line in f if line.startswith("Pss:"))
        except OSError:
            continue
    return found


def run_arm(cmd: list[str], env: dict[str, str], log: Path, cwd: str | None = None) -> dict:
    peak: list = [0, {}]  # total, and the processes at that moment
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=cwd)

        def sample() -> None:
            while proc.poll() is None:
                sample = tree_pss(proc.pid)
                if sum(sample.values()) > peak[0]:
                    peak[:] = [sum(sample.values()), sample]
                time.sleep(1.0)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        proc.wait()
        sampler.join()
    wall = time.perf_counter() - start
    text = log.read_text()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}); see {log}")
    best = float(re.findall(r"best val_acc: ([0-9.]+)", text)[-1])
    top = sorted(peak[1].items(), key=lambda kv: -kv[1])[:8]
    return {"wall_s": wall, "peak_pss_gb": peak[0] / 2**30, "best_val_acc": best, "log": str(log),
            "peak_by_process_gb": {k: round(v / 2**30, 3) for k, v in top}}


def commit(tree: Path = HERE) -> str:
    """The code measured: a result without it cannot be compared with a later one."""
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(tree), *args], capture_output=True, text=True).stdout.strip()

    # the results a benchmark writes as it goes are not a change to the code it measures
    changed = git("status", "--porcelain", "--", ":(top)", ":(top,exclude)benchmarks/results")
    head = git("describe", "--always")
    return f"{head}-dirty" if changed else head or "unknown"


def versions() -> dict[str, str]:
    """What a figure was measured with (pip may pull another torch from one day to the next)."""
    import platform

    import optuna
    import ray
    import torch

    return {"torch": torch.__version__, "ray": ray.__version__, "optuna": optuna.__version__,
            "python": platform.python_version(), "cpus": str(os.cpu_count())}


def tutorial_arm(args: argparse.Namespace) -> None:
    """Child process: the tutorial-style trainable through our Tuner."""
    import dataclasses

    from benchmarks.tutorial_trainable import make_tutorial_trainable
    from experiments import EXPERIMENTS
    from tuning.app.search import Placement, build_tuner, start_ray

    experiment = dataclasses.replace(EXPERIMENTS.get(args.experiment), samples=args.samples, seed=args.seed)
    if args.epochs:
        experiment = dataclasses.replace(experiment, epochs=args.epochs)
    placement = Placement(storage=args.storage, name="tutorial")
    start_ray()
    grid = build_tuner(experiment, placement, make_tutorial_trainable(experiment, placement, args.data_root)).fit()
    best = max(r.metrics.get("best_val_acc", 0.0) for r in grid if r.metrics)
    epochs = sum(int(r.metrics.get("epoch", 0)) for r in grid if r.metrics)
    print(f"trials: {len(grid)}, errored: {len(grid.errors)}, trial-epochs: {epochs}")
    print(f"best val_acc: {best:.4f}")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data-root", type=Path, required=True)
    p.add_argument("--experiment", default="hymenoptera")
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None, help="override the experiment's (quick checks only)")
    p.add_argument("--arms", default="ours,tutorial")
    p.add_argument("--storage", default=None, help="run dirs (default: a fresh temporary dir)")
    p.add_argument("--out", type=Path, default=HERE / "results" / "search.json")
    p.add_argument("--code", action="append", default=[], metavar="NAME=DIR",
                   help="an arm NAME: ours with the code in DIR (a worktree of another commit)")
    p.add_argument("--arm", help=argparse.SUPPRESS)  # internal: run one arm in this process
    args = p.parse_args()
    if args.arm == "tutorial":
        return tutorial_arm(args)

    work = Path(args.storage or tempfile.mkdtemp(prefix="tuning-bench-search-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": f"{HERE.parent}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    ours = [sys.executable, "-m", "tuning.run", args.experiment, "--samples", str(args.samples),
            "--seed", str(args.seed), "--data-root", str(args.data_root.resolve()), "--storage", str(work)]
    commands = {
        "ours": ours,
        "glibc": list(ours),  # the same command with glibc's malloc (tuning.lib.allocator)
        "tutorial": [sys.executable, "-m", "benchmarks.search", "--arm", "tutorial", "--experiment", args.experiment,
                     "--samples", str(args.samples), "--seed", str(args.seed), "--data-root", str(args.data_root),
                     "--storage", str(work)],
    }
    code = dict(spec.split("=", 1) for spec in args.code)  # arm -> the tree its code comes from
    for arm in code:
        commands[arm] = list(ours)
    if args.epochs:
        for cmd in commands.values():
            cmd += ["--epochs", str(args.epochs)]
    results = {}
    for arm in args.arms.split(","):
        key = arm if arm not in results else f"{arm}#{sum(k.split('#')[0] == arm for k in results) + 1}"  # repeats
        print(f"running {key} ...", flush=True)
        # each run starts cold (decoding and features are timed) in a run dir and cache of its own
        slug = key.replace("#", "-")
        cmd = commands[arm] + (["--name", slug] if arm != "tutorial" else [])
        arm_env = {**env, "TUNING_CACHE_DIR": str(work / f"cache-{slug}"), **({"TUNING_JEMALLOC": "0"} if arm == "glibc" else {})}
        tree = str(Path(code[arm]).resolve()) if arm in code else None
        if tree:  # `python -m` imports from its working dir first; Ray's workers from PYTHONPATH
            arm_env["PYTHONPATH"] = f"{tree}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"
        results[key] = run_arm(cmd, arm_env, work / f"{slug}.log", cwd=tree)
        r = results[key]
        print(f"{key:>9}: {r['wall_s']:8.0f} s   best val_acc {r['best_val_acc']:.4f}   peak memory {r['peak_pss_gb']:.2f} GB",
              flush=True)
    summary = {"commit": commit(), "versions": versions(), "experiment": args.experiment, "samples": args.samples, "seed": args.seed,
               "cpus": os.cpu_count(),
               "code": {arm: {"dir": tree, "commit": commit(Path(tree))} for arm, tree in code.items()},
               "arms": results}
    if {"ours", "tutorial"} <= results.keys():
        summary["speedup"] = results["tutorial"]["wall_s"] / results["ours"]["wall_s"]
        print(f"speed-up (tutorial wall-clock / ours): {summary['speedup']:.2f}x")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(summary, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
