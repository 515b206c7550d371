"""The final model on held-out test images: each way of making it from one search, side by side.

For every dataset and seed, one search (`tuning.search`, its default export) runs on a split with
a test part that no choice reads, then every arm is scored on that test part:
- probe: the plain linear probe (tuning.lib.probe on centre crops of the pretrained network's pooled
  features, temperature 1), as a user fits it by hand and as every table here has it;
- probe_mirror: the search's own probe, fitted on the mirror images too and averaged over each test
  image and its mirror (an experiment that flips training views, `Experiment.hflip`), temperature 1;
- best_acc: the rule before calibration, best val_acc then lower val_loss (temperature 1);
- select, soup, ensemble: tuning.app.final_model's methods on the same candidates, calibrated;
- default: what the search exported (model.json's test metrics, scored by the search itself);
- tutorial: a plain Ray Tune search over the seeds' loop (benchmarks/tutorial_trainable.py: OptunaSearch
  with the recipe first, epoch-based ASHA), same samples, epochs and seed; its best trial's best
  epoch (best val_acc, then lower val_loss), scored on test when that epoch was reached.
Both searches run in a process of their own: a wall-clock is that process's, from interpreter start
to exit (imports, Ray's start and stop), as a user's command pays it; the probe's runs from the same
start to when the probe was known. The other arms add their combination step to ours.
Datasets: hymenoptera re-split 50/20/30 (stratified, seeded by the seed) from its 397 images;
pokemon_shift as it is (train normal colours, val shiny front, test shiny back); digits, sklearn's
8x8 digits redrawn as MNIST's 20 px digit in a 28 px frame, 60/20/20, trained as `mnist` is.

    python -m benchmarks.final_model --data-root ../shared/datasets --runs hymenoptera:0-4:32x8,pokemon_shift:0-2:16x4,digits:0-1:8x3

Writes benchmarks/results/final_model.json after every run (the misses too) and prints the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from benchmarks.search import HERE, commit, versions

ARMS = ("probe", "probe_mirror", "best_acc", "select", "soup", "ensemble", "default", "tutorial")


def stratified(labels: list[int], fractions: tuple[float, ...], seed: int) -> list[int]:
    """A split index per item: per class, shuffled by `seed`, cut at the fractions."""
    rng = np.random.default_rng(seed)
    which = [0] * len(labels)
    for cls in sorted(set(labels)):
        idx = [i for i, y in enumerate(labels) if y == cls]
        rng.shuffle(idx)
        cuts = np.cumsum([round(f * len(idx)) for f in fractions[:-1]])
        for part, chunk in enumerate(np.split(np.array(idx), cuts)):
            for i in chunk:
                which[i] = part
    return which


def resplit(files: list[tuple[Path, str]], out: Path, seed: int, fractions=(0.5, 0.2, 0.3)) -> Path:
    """Links to `files` (path, class) under out/{train,val,test}/CLASS/."""
    classes = sorted({c for _, c in files})
    parts = stratified([classes.index(c) for _, c in files], fractions, seed)
    for (path, cls), part in zip(files, parts):
        target = out / ("train", "val", "test")[part] / cls / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        target.symlink_to(path.resolve())
    return out


def hymenoptera(data_root: Path, out: Path, seed: int) -> Path:
    src = data_root / "hymenoptera_data"
    files = sorted((p, p.parent.name) for p in src.glob("*/*/*") if p.is_file())
    return resplit(files, out, seed)


def digits(out: Path, seed: int) -> Path:
    """sklearn's bundled 1,797 8x8 digits, each upscaled to 20x20 in a 28x28 frame (MNIST's layout)."""
    from PIL import Image
    from sklearn.datasets import load_digits

    bunch = load_digits()
    images = []
    for i, (pixels, label) in enumerate(zip(bunch.images, bunch.target)):
        digit = Image.fromarray((pixels * 255 / 16).astype(np.uint8)).resize((20, 20), Image.BILINEAR)
        frame = Image.new("L", (28, 28))
        frame.paste(digit, (4, 4))
        path = out / "all" / str(label) / f"{i:04d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.save(path)
        images.append((path, str(label)))
    return resplit(images, out / "split", seed, (0.6, 0.2, 0.2))


def dataset(name: str, data_root: Path, work: Path, seed: int) -> Path:
    if name == "hymenoptera":
        return hymenoptera(data_root, work / "data", seed)
    if name == "pokemon_shift":
        return data_root / "pokemon_shift"
    if name == "digits":
        return digits(work / "data", seed)
    raise SystemExit(f"unknown dataset {name!r}")


def experiment_for(name: str, folder: Path, samples: int, epochs: int, seed: int):
    from experiments import get_experiment
    from experiments.mnist import MNIST

    base = dataclasses.replace(MNIST, name="digits", dataset=f"folder:{folder}") if name == "digits" \
        else dataclasses.replace(get_experiment(f"folder:{folder}"), name=name)
    return dataclasses.replace(base, samples=samples, epochs=epochs, seed=seed)


def arm_log_p(final, test_logits: Callable[[Any], np.ndarray]) -> np.ndarray:
    """An arm's test log-probabilities: its members' test logits mixed by weight, each at the
    temperature fitted on val, except best_acc's (the rule before calibration: temperature 1)."""
    from tuning.lib import calibration as C

    return C.mixture([C.log_probs(test_logits(c), 1.0 if final.method == "best_acc" else c.temperature)
                      for c, _ in final.members], [w for _, w in final.members])


def plain_probe(probe, meta: dict[str, Any], experiment, data, test_x, forward: Callable) -> np.ndarray:
    """Test logits of the plain linear probe: fitted on the centre crops' pooled features of the
    pretrained network (the search's probe checkpoint holds it), L2 chosen on val, no mirrors."""
    import torch

    from tuning.app.export import member_net
    from tuning.lib.backbones import BACKBONES
    from tuning.lib.checkpoint import load_state
    from tuning.lib.data.transforms import Normalize, eval_batch
    from tuning.lib.probe import fit_probe

    net = member_net(meta, probe.freeze_depth, load_state(probe.checkpoint_path)["model"])
    pooled = lambda images: torch.from_numpy(forward(net.frozen_features, images))  # noqa: E731
    spec = BACKBONES.get(experiment.backbone)
    norm = Normalize.for_mode(spec.mean, spec.std, experiment.image_mode)
    crops = {k: norm(eval_batch(data.splits[k].images, experiment.image_size)) for k in ("train", "val")}
    labels = {k: torch.as_tensor(data.splits[k].labels) for k in crops}
    fitted = fit_probe(pooled(crops["train"]), labels["train"], pooled(crops["val"]), labels["val"], len(data.classes))
    return (pooled(test_x) @ fitted.weight.T + fitted.bias).numpy()


def test_scores(run_dir: Path, experiment, data, logits_out: Path | None = None) -> dict[str, dict[str, Any]]:
    """Every arm made from the search's candidates, scored on the test split. With `logits_out`,
    every candidate's val and test logits go to that .npz: a later combination rule can then be
    designed on them, and checked, without searching again."""
    import torch

    from tuning.app import final_model as F
    from tuning.app.api import soup_data
    from tuning.app.export import member_net
    from tuning.lib import calibration as C
    from tuning.lib import metrics as M
    from tuning.lib.backbones import BACKBONES
    from tuning.lib.data.transforms import Normalize, eval_batch

    record = F.load_record(run_dir)
    meta = json.loads((run_dir / "best" / "model.json").read_text())
    labels_val = np.asarray(data.splits["val"].labels)
    test = data.splits["test"]
    labels = np.asarray(test.labels)
    spec = BACKBONES.get(experiment.backbone)
    norm = Normalize.for_mode(spec.mean, spec.std, experiment.image_mode)
    x = norm(eval_batch(test.images, experiment.image_size))
    logits: dict[tuple[str, bool], np.ndarray] = {}

    def forward(net, images: torch.Tensor) -> np.ndarray:
        with torch.no_grad():
            return torch.cat([net(images[i : i + 16]).float() for i in range(0, len(images), 16)]).numpy()

    def test_logits(path: str, depth: int, state=None, mirror: bool = False) -> np.ndarray:
        """A candidate's test logits; `mirror`: averaged with its mirror images' (as its val logits are)."""
        if (path, mirror) not in logits or state is not None:
            from tuning.lib.checkpoint import load_state

            net = member_net(meta, depth, state if state is not None else load_state(path)["model"])
            out = (forward(net, x) + forward(net, x.flip(-1))) / 2 if mirror else forward(net, x)
            if state is not None:
                return out
            logits[(path, mirror)] = out
        return logits[(path, mirror)]

    arms: dict[str, dict[str, Any]] = {}
    candidates = F.candidates_of(record)
    probe = next(c for c in candidates if c.is_probe)
    arms["probe"] = {"what": "plain probe", **C.scores(C.log_probs(plain_probe(probe, meta, experiment, data, x, forward)), labels)}
    if probe.mirrored:
        arms["probe_mirror"] = {"what": "probe", **C.scores(C.log_probs(
            test_logits(probe.checkpoint_path, probe.freeze_depth, mirror=True)), labels)}
    for method in ("best_acc", "select", "ensemble", "soup"):
        final = F.choose(candidates, labels_val, method, soup_data(experiment, data) if method == "soup" else None)
        if final.soup_state is not None and len(final.members) > 1:
            log_p = C.log_probs(test_logits("soup", 0, final.soup_state), final.soup_temperature)
        else:
            log_p = arm_log_p(final, lambda c: test_logits(c.checkpoint_path, c.freeze_depth, mirror=c.mirrored))
        arms[method] = {"what": final.describe(), "combine_s": round(final.seconds, 2), **C.scores(log_p, labels)}
    m = meta["metrics"]
    arms["default"] = {"what": meta["final"]["kind"], "acc": m["test_acc"], "nll": m["test_nll"], "ece": m["test_ece"]}
    arms["candidates"] = len(candidates)  # type: ignore[assignment]
    if logits_out is not None:
        logits_out.parent.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            logits_out, names=np.array([c.name for c in candidates]), labels_val=labels_val, labels_test=labels,
            val=np.stack([c.val_logits for c in candidates]).astype(np.float32),
            test=np.stack([test_logits(c.checkpoint_path, c.freeze_depth, mirror=c.mirrored) for c in candidates]).astype(np.float32),
            freeze_depth=np.array([c.freeze_depth for c in candidates]), is_probe=np.array([c.is_probe for c in candidates]),
            val_acc=np.array([c.metrics[M.VAL_ACC] for c in candidates]), epoch=np.array([c.metrics[M.EPOCH] for c in candidates]),
            val_loss=np.array([c.metrics[M.VAL_LOSS] for c in candidates]))
    return arms


def ours_child(args: argparse.Namespace) -> None:
    """Child process: our search on the folder, as `python -m tuning.run` runs it (Ray stopped meanwhile
    at the end); prints its run dir as json."""
    import tuning

    experiment = experiment_for(args.dataset, Path(args.folder), args.samples, args.epochs, args.seed)
    result = tuning.search(experiment, storage=str(Path(args.work) / "runs"), name="ours", stop_ray=True)
    print("RESULT " + json.dumps({"run_dir": result.run_dir, "final_model": result.final_model}))


def child(kind: str, name: str, folder: Path, samples: int, epochs: int, seed: int, work: Path,
          concurrency: int = 2) -> tuple[dict[str, Any] | None, str, float]:
    """A search in a fresh process, so that each arm's wall-clock counts what a user's command
    pays: the interpreter, the imports, Ray's start and stop. Its stderr goes to the console as it
    comes. Returns (its RESULT json, or None if it printed none; an error line for that case,
    ending with its last stderr line; start time)."""
    started = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "benchmarks.final_model", f"--{kind}-child", "--dataset", name,
                             "--folder", str(folder), "--samples", str(samples), "--epochs", str(epochs),
                             "--seed", str(seed), "--work", str(work), "--tutorial-concurrency", str(concurrency)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    last: list[str] = []

    def relay() -> None:  # a failing child's cause then reaches the results file, not only the console
        for l in proc.stderr:
            sys.stderr.write(l)
            if l.strip():
                last[:] = [l.strip()]

    relaying = threading.Thread(target=relay, daemon=True)
    relaying.start()
    stdout = proc.stdout.read()
    proc.wait()
    relaying.join()
    line = next((l for l in stdout.splitlines() if l.startswith("RESULT ")), None)
    print("\n".join(l for l in stdout.splitlines() if not l.startswith("RESULT ")), flush=True)
    error = f"{kind} search exited with {proc.returncode}" + (f": {last[0][:300]}" if last else "")
    return (json.loads(line[7:]) if line else None), error, started


def ours(name: str, folder: Path, samples: int, epochs: int, seed: int, work: Path,
         logits_out: Path | None = None) -> dict[str, Any]:
    from tuning.app.api import load_data

    experiment = experiment_for(name, folder, samples, epochs, seed)
    result, error, started = child("ours", name, folder, samples, epochs, seed, work)
    wall = time.time() - started
    if result is None:
        raise RuntimeError(error)
    _, data = load_data(experiment, None, open("/dev/null", "w"))
    arms = test_scores(Path(result["run_dir"]), experiment, data, logits_out)
    record = json.loads((Path(result["run_dir"]) / "probe.json").read_text())
    for arm in ("probe", "probe_mirror"):  # both known when the search's probe is
        if arm in arms:
            arms[arm]["wall_s"] = round(record["timestamp"] - started, 1)
    combine = {k: v.get("combine_s", 0.0) for k, v in arms.items() if isinstance(v, dict)}
    for arm in ("best_acc", "select", "ensemble", "soup"):
        arms[arm]["wall_s"] = round(wall - combine["ensemble"] + combine[arm], 1)
    arms["default"]["wall_s"] = round(wall, 1)
    arms["default"]["line"] = result["final_model"]
    return arms


def tutorial_child(args: argparse.Namespace) -> None:
    """Child process: the tutorial-style search on the folder; prints its final model's test scores as json."""
    from benchmarks.tutorial_trainable import tutorial_tuner
    from tuning.app.search import start_ray

    experiment = experiment_for(args.dataset, Path(args.folder), args.samples, args.epochs, args.seed)
    start_ray()
    tuner = tutorial_tuner(experiment, args.work, folder=Path(args.folder), max_concurrent=args.concurrency)
    grid = tuner.fit()
    finals = [r.metrics for r in grid if r.metrics and "best_test_acc" in r.metrics]
    if not finals:
        causes = {str(r.error).strip().splitlines()[-1][:200] for r in grid if r.error is not None}
        raise SystemExit(f"no tutorial trial reached its end: {'; '.join(sorted(causes)) or 'no error recorded'}")
    best = max(finals, key=lambda m: (m["best_val_acc"], -m["best_val_loss"]))
    print("RESULT " + json.dumps({"val_acc": best["best_val_acc"], "acc": best["best_test_acc"],
                                  "nll": best["best_test_nll"], "ece": best["best_test_ece"], "trials": len(grid)}))


def tutorial(name: str, folder: Path, samples: int, epochs: int, seed: int, work: Path,
             concurrency: int = 2) -> dict[str, Any]:
    result, error, started = child("tutorial", name, folder, samples, epochs, seed, work, concurrency)
    timing = {"wall_s": round(time.time() - started, 1), "concurrency": concurrency}
    return {**result, **timing} if result is not None else {"error": error, **timing}


def rescore(kept: Path, out: Path) -> None:
    """The arms made from each kept search again, by the current code; times and the tutorial arm as kept."""
    from tuning.app.api import load_data

    doc = {"commit": commit(), "versions": versions(), "rescored_from": str(kept), "results": []}
    for row_file in sorted(kept.glob("*/row.json")):
        row = json.loads(row_file.read_text())
        experiment = experiment_for(row["dataset"], Path(row["folder"]), row["samples"], row["epochs"], row["seed"])
        _, data = load_data(experiment, None, open("/dev/null", "w"))
        arms = test_scores(row_file.parent / "runs" / "ours", experiment, data)
        for arm, scores in arms.items():
            if isinstance(scores, dict) and arm in row["arms"] and arm != "default":
                row["arms"][arm].update({k: v for k, v in scores.items() if k != "wall_s"})
        doc["results"].append(row)
    out.write_text(json.dumps(doc, indent=2))
    print(table(doc["results"]))


def parse_runs(spec: str) -> list[tuple[str, int, int, int]]:
    """"hymenoptera:0-4:32x8,pokemon_shift:0-2:16x4" -> (dataset, seed, samples, epochs) per run."""
    runs = []
    for part in spec.split(","):
        name, seeds, size = part.split(":")
        lo, _, hi = seeds.partition("-")
        samples, epochs = map(int, size.split("x"))
        runs += [(name, s, samples, epochs) for s in range(int(lo), int(hi or lo) + 1)]
    return runs


def table(results: list[dict[str, Any]]) -> str:
    lines = ["| dataset | seed | scale | " + " | ".join(ARMS) + " |", "|---|---|---|" + "---|" * len(ARMS)]
    for r in results:
        cells = []
        for arm in ARMS:
            a = r["arms"].get(arm)
            if not a or "acc" not in a:
                cells.append("-" if not a else f"error: {a.get('error', '')[:40]}")
            else:
                cells.append(f"{a['acc']:.3f} / {a['nll']:.3f} / {a['ece']:.3f}, {a.get('wall_s', 0):.0f} s")
        lines.append(f"| {r['dataset']} | {r['seed']} | {r['samples']}x{r['epochs']} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def merged(files: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Rows of several results files as one list: a run (dataset, seed, scale) met again adds its arms."""
    rows: dict[tuple, dict[str, Any]] = {}
    for results in files:
        for r in results:
            key = (r["dataset"], r["seed"], r["samples"], r["epochs"])
            rows.setdefault(key, {**r, "arms": {}})["arms"].update(r["arms"])
    return list(rows.values())


def summary(results: list[dict[str, Any]]) -> str:
    """Per dataset, each arm's mean test accuracy / NLL / ECE and wall-clock over the runs that have it."""
    lines = ["| dataset (runs) | " + " | ".join(ARMS) + " |", "|---|" + "---|" * len(ARMS)]
    for name in dict.fromkeys(r["dataset"] for r in results):
        rows = [r for r in results if r["dataset"] == name]
        cells = []
        for arm in ARMS:
            have = [r["arms"][arm] for r in rows if "acc" in r["arms"].get(arm, {})]
            if not have:
                cells.append("-")
                continue
            mean = {k: float(np.mean([a[k] for a in have])) for k in ("acc", "nll", "ece", "wall_s")}
            cells.append(f"{mean['acc']:.3f} / {mean['nll']:.3f} / {mean['ece']:.3f}, {mean['wall_s']:.0f} s"
                         + (f" ({len(have)})" if len(have) != len(rows) else ""))
        lines.append(f"| {name} ({len(rows)}) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="benchmarks.final_model", description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default="../shared/datasets")
    p.add_argument("--runs", default="hymenoptera:0-4:32x8,pokemon_shift:0-2:16x4,digits:0-1:8x3")
    p.add_argument("--tutorial-for", help="run the tutorial-style arm (the slowest) only for these DATASET:SEEDS, "
                   "e.g. hymenoptera:0-1,digits:0 (default: every run)")
    p.add_argument("--out", default=str(HERE / "results" / "final_model.json"))
    p.add_argument("--keep", help="keep each run's folder (data, run dir, tutorial arm) under this folder")
    p.add_argument("--rescore", help="no searching: score the arms again from the run folders kept under this "
                   "folder by --keep, with the code as it is now (the tutorial arm and searches' times as kept)")
    p.add_argument("--tutorial-only", action="store_true", help="run only the tutorial-style arm (its rows merge "
                   "with a full run's in --table)")
    p.add_argument("--save-logits", help="write every candidate's val and test logits under this folder, one "
                   "DATASET-SEED-SCALE.npz per run (to design a combination rule without searching again)")
    p.add_argument("--tutorial-concurrency", dest="concurrency", type=int, default=2,
                   help="trials the tutorial-style arm runs at a time (default 2; 1 where two full fine-tunings "
                   "outgrow the machine's memory: its wall-clock then counts one trial at a time)")
    p.add_argument("--table", help="print the tables of results files written before (comma-separated: rows of the "
                   "same dataset, seed and scale are merged, arm by arm), and exit")
    p.add_argument("--tutorial-child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ours-child", action="store_true", help=argparse.SUPPRESS)
    for name in ("dataset", "folder", "work"):
        p.add_argument(f"--{name}", help=argparse.SUPPRESS)
    p.add_argument("--samples", type=int, help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, help=argparse.SUPPRESS)
    p.add_argument("--seed", type=int, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.tutorial_child:
        return tutorial_child(args)
    if args.ours_child:
        return ours_child(args)
    if args.rescore:
        return rescore(Path(args.rescore), Path(args.out))
    if args.table:
        results = merged([json.loads(Path(f).read_text())["results"] for f in args.table.split(",")])
        return print(table(results) + "\n\n" + summary(results))
    out = Path(args.out)
    doc = {"commit": commit(), "versions": versions(), "runs": args.runs, "tutorial_for": args.tutorial_for,
           "tutorial_only": args.tutorial_only,
           "tutorial_concurrency": args.concurrency, "results": []}
    tutorial_runs = {(n, s) for n, s, _, _ in parse_runs(",".join(f"{part}:1x1" for part in args.tutorial_for.split(",")))} \
        if args.tutorial_for else set()
    for name, seed, samples, epochs in parse_runs(args.runs):
        if args.keep:
            Path(args.keep).mkdir(parents=True, exist_ok=True)
        work = Path(tempfile.mkdtemp(prefix=f"tuning-bench-final-{name}-{seed}-", dir=args.keep))
        try:
            folder = dataset(name, Path(args.data_root), work, seed)
            row = {"dataset": name, "seed": seed, "samples": samples, "epochs": epochs, "arms": {}}
            try:
                if not args.tutorial_only:
                    npz = Path(args.save_logits) / f"{name}-{seed}-{samples}x{epochs}.npz" if args.save_logits else None
                    row["arms"] = ours(name, folder, samples, epochs, seed, work, npz)
            except Exception as err:  # a miss is reported, not dropped
                row["arms"] = {"default": {"error": f"{type(err).__name__}: {err}"}}
            if args.tutorial_for is None or (name, seed) in tutorial_runs:
                row["arms"]["tutorial"] = tutorial(name, folder, samples, epochs, seed, work, args.concurrency)
            doc["results"].append(row)
            out.write_text(json.dumps(doc, indent=2))
            (work / "row.json").write_text(json.dumps({**row, "folder": str(folder)}, indent=2))
            print(table([row]).splitlines()[-1], flush=True)
        finally:
            if not args.keep:
                shutil.rmtree(work, ignore_errors=True)
    print(table(doc["results"]) + "\n\n" + summary(doc["results"]))


if __name__ == "__main__":
    main()
