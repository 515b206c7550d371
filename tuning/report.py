"""`python -m tuning.report RUN_DIR`: a ranked table and plots of a finished, running or resumed
search: val_acc per epoch for every trial, val_acc against each hyperparameter, the
hyperparameters' importance (Optuna's fANOVA) and the exported trial's val confusion matrix."""
from __future__ import annotations

import argparse
import math
import os
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import matplotlib.ticker  # noqa: E402
import optuna  # noqa: E402
import pandas as pd  # noqa: E402
from ray.tune import ExperimentAnalysis  # noqa: E402

from experiments.base import Experiment  # noqa: E402
from search_spaces import space_for  # noqa: E402
from tuning.app import final_model, results  # noqa: E402
from tuning.app.evaluation import score, split_images  # noqa: E402
from tuning.app.export import META_FILE  # noqa: E402
from tuning.app.figures import confusion_png  # noqa: E402
from tuning.app.location import RunLocation, parse_run_dir  # noqa: E402
from tuning.app.predictor import load  # noqa: E402
from tuning.app.probing import PROBE_ID, PROBE_ONLY  # noqa: E402
from tuning.app.rundir import SPEC_FILE, load_spec  # noqa: E402
from tuning.lib import metrics as M  # noqa: E402
from tuning.lib.data.fetch import DATA_ROOT_ENV  # noqa: E402
from tuning.lib.errors import UsageError, exit_on_usage_error  # noqa: E402


def ranked(table: pd.DataFrame) -> pd.DataFrame:
    """Best first, by the export's rule: val_acc, then the lower val_loss at that epoch."""
    return table.sort_values(["best_val_acc", "best_val_loss"], ascending=[False, True],
                             na_position="last").reset_index(drop=True)


def replay(table: pd.DataFrame, experiment: Experiment) -> optuna.Study:
    """Each finished trial, replayed through the experiment's search space into a fresh study, so
    Optuna knows the distributions (log scale, domains) and can judge importance."""
    done = table[table["best_val_acc"].notna() & (table["trial_id"] != PROBE_ID)]
    hp_cols = [c for c in table.columns if c.startswith("hp_") and c[3:] not in PROBE_ONLY]
    space = space_for(experiment)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(seed=0))
    for _, row in done.iterrows():
        study.enqueue_trial({c[3:]: row[c] for c in hp_cols})
        trial = study.ask()
        space(trial)
        study.tell(trial, float(row["best_val_acc"]))
    return study


def log_scaled(study: optuna.Study) -> set[str]:
    """The hyperparameters the search space samples on a log scale."""
    return {name for t in study.trials for name, d in t.distributions.items() if getattr(d, "log", False)}


def importances(table: pd.DataFrame, study: optuna.Study) -> dict[str, float]:
    """fANOVA's share of val_acc variance per hyperparameter; empty when there is too little to tell."""
    done = table[table["best_val_acc"].notna() & (table["trial_id"] != PROBE_ID)]
    if len(done) < 3 or done["best_val_acc"].nunique() < 2:
        return {}
    return optuna.importance.get_param_importances(study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))


def plot_curves(run_dir: str, table: pd.DataFrame, max_epochs: int, out: Path) -> None:
    frames = ExperimentAnalysis(run_dir).trial_dataframes
    status = dict(zip(table["trial_id"], table["status"]))
    fig, ax = plt.subplots(figsize=(8, 5))
    colours = {results.COMPLETED: "tab:blue", results.STOPPED: "tab:gray", results.ERRORED: "tab:red",
               results.DIVERGED: "tab:red", results.RUNNING: "tab:green"}
    for trial_id, df in frames.items():
        if M.EPOCH not in df or df.empty:
            continue
        s = status.get(trial_id, results.RUNNING)
        ax.plot(df[M.EPOCH], df[M.VAL_ACC], "-", color=colours.get(s, "tab:blue"), alpha=0.6, lw=1.2)
        ax.plot(df[M.EPOCH].iloc[-1], df[M.VAL_ACC].iloc[-1], "x" if s == results.STOPPED else "o",
                color=colours.get(s, "tab:blue"), ms=5)
    for s, c in colours.items():
        if s in status.values():
            ax.plot([], [], color=c, label=s)
    ax.set(xlabel="epoch (fractions: reports at an ASHA rung inside an epoch)", ylabel="val_acc", xlim=(0, max_epochs + 0.2),
           title="val_acc per epoch (x: stopped early by ASHA)")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_hparams(table: pd.DataFrame, log_scale: set[str], out: Path) -> None:
    table = table[table["trial_id"] != PROBE_ID]  # the probe has only its own two hyperparameters
    hp_cols = [c for c in table.columns if c.startswith("hp_") and c[3:] not in PROBE_ONLY]
    fig, axes = plt.subplots(1, len(hp_cols), figsize=(4 * len(hp_cols), 3.6), sharey=True)
    for ax, col in zip(axes if len(hp_cols) > 1 else [axes], hp_cols):
        ax.scatter(table[col], table["best_val_acc"], c=table["epochs_run"], cmap="viridis", s=28)
        if col[3:] in log_scale:
            ax.set_xscale("log")
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
        elif col == "hp_batch_size":
            ax.set_xscale("log", base=2)
            ax.xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
        ax.set(xlabel=col[3:])
        ax.grid(alpha=0.3)
    (axes[0] if len(hp_cols) > 1 else axes).set_ylabel("best val_acc (colour: epochs run)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def plot_importance(scores: dict[str, float], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(6, 3))
    names = list(scores)[::-1]
    ax.barh(names, [scores[n] for n in names], color="tab:blue")
    ax.set(xlabel="importance (fANOVA, share of val_acc variance)", title="hyperparameter importance")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def val_confusion(export_dir: Path, data_root: str | None, out: Path) -> Path | None:
    """The exported model's confusion matrix on the run's val split, the split its val_acc was
    measured on. None while nothing is exported; a warning when the data is not on this machine.
    Only with a data root named (flag or environment): a report never downloads a dataset."""
    if not (export_dir / META_FILE).is_file():
        return None
    if not (data_root or os.environ.get(DATA_ROOT_ENV)):
        print(f"note: no val confusion matrix without the data: pass --data-root or set {DATA_ROOT_ENV}", file=sys.stderr)
        return None
    try:
        predictor = load(export_dir)
        scored = score(predictor, split_images(export_dir, predictor, data_root, "val"))
    except UsageError as err:
        print(f"warning: no val confusion matrix: {err}", file=sys.stderr)
        return None
    title = (f"exported trial {predictor.meta['trial_id']}, {scored.images.source}:\n"
             f"accuracy {scored.accuracy:.4f} ({len(scored.probs)} images)")
    return confusion_png(scored, out, title)


def report(location: RunLocation, data_root: str | None = None) -> tuple[pd.DataFrame, list[Path]]:
    location.pull(SPEC_FILE, "best", final_model.FINAL_FILE)
    if not (location.local / SPEC_FILE).is_file():
        raise UsageError(f"{location.uri} is not a run dir (no {SPEC_FILE})")
    experiment, _ = load_spec(location.local)
    table = ranked(results.collect(location))
    pngs = [location.local / "val_acc_per_epoch.png", location.local / "val_acc_vs_hparams.png"]
    plot_curves(location.uri, table, experiment.epochs, pngs[0])
    study = replay(table, experiment)
    plot_hparams(table, log_scaled(study), pngs[1])
    scores = importances(table, study)
    if scores:
        pngs.append(location.local / "hparam_importance.png")
        plot_importance(scores, pngs[-1])
    matrix = val_confusion(location.local / "best", data_root, location.local / "val_confusion_matrix.png")
    if matrix is not None:
        pngs.append(matrix)
    location.push(*(p.name for p in pngs))
    return table, pngs


def format_table(table: pd.DataFrame) -> str:
    cols = ["trial_id", *[c for c in table.columns if c.startswith("hp_")],
            "best_val_acc", "best_val_loss", "best_epoch", "epochs_run", "status", "wall_time_s"]
    shown = table[cols].rename(columns=lambda c: c.removeprefix("hp_"))
    shown.insert(0, "", ["exported" if e else "" for e in table["exported"]])
    return shown.to_string(index=True, float_format=lambda v: f"{v:.4g}" if not math.isnan(v) else "-")


def format_final(record: dict | None) -> str:
    """The candidates the export was chosen from (tuning.app.final_model), best calibrated first."""
    if record is None:
        return "final model: not recorded (a run from before final.json)"
    members = ", ".join(f"{m['trial_id']}@{m['epoch']} x{m['weight']:.2f}" for m in record["members"])
    val = record["val"]
    lines = [f"final model: {record['kind']} by {record['method']} ({members}): val_acc {val['acc']:.4f}, "
             f"val NLL {val['nll']:.4f}, ECE {val['ece']:.4f} after calibration"
             + (", each image averaged with its mirror" if record.get("mirror") else "")
             + (f", the trials' ensemble's lead over the probe on val at p {record['lead_p']:.2g}"
                if record.get("lead_p") is not None else "")
             + f", chosen in {record['seconds']:.1f} s",
             f"its {len(record['candidates'])} candidates (the probe and each trial's kept checkpoints):"]
    shown = pd.DataFrame(record["candidates"]).drop(columns=["checkpoint"], errors="ignore")
    shown = shown.sort_values("calibrated_val_nll", kind="stable")
    shown = shown.rename(columns={"calibrated_val_nll": "calibrated val NLL", "calibrated_val_ece": "calibrated ECE",
                                  "val_loss": "val NLL", "weight": "weight in export"})
    lines.append(shown.to_string(index=False, float_format=lambda v: f"{v:.4g}"))
    return "\n".join(lines)


def location_of(run_dir: str) -> RunLocation:
    return parse_run_dir(run_dir)  # a URI's query (endpoint, region) stays a query


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tuning.report", description=__doc__.split("\n")[0])
    parser.add_argument("run_dir", help="a run dir: a path, or a URI such as s3://bucket/runs/NAME")
    parser.add_argument("--data-root", help="folder holding the datasets, for the val confusion matrix "
                        "(default: $TUNING_DATA_ROOT, else ./data)")
    args = parser.parse_args(argv)
    with exit_on_usage_error("tuning.report"):
        location = location_of(args.run_dir)
        table, pngs = report(location, args.data_root)
    print(format_table(table))
    print()
    print(format_final(final_model.load_record(location.local)))
    for png in pngs:
        print(f"wrote {png}")


if __name__ == "__main__":
    main()
