"""The final model's arms scored again from saved logits, without searching: each .npz that
`python -m benchmarks.final_model --save-logits DIR` wrote holds every candidate's val and test
logits, so a combination rule can be designed on some splits and checked on others in seconds.

    python -m benchmarks.final_model_offline benchmarks/results/logits/hymenoptera-15-32x8.npz ...
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.final_model import arm_log_p
from tuning.app import final_model as F
from tuning.lib import calibration as C
from tuning.lib import metrics as M

ARMS = ("probe", "best_acc", "select", "ensemble")


def candidates(saved: np.lib.npyio.NpzFile) -> tuple[list[F.Candidate], np.ndarray]:
    """The run's candidates with their val logits, and each one's test logits in the same order."""
    found = [F.Candidate(str(name).split("@")[0], {}, {M.VAL_ACC: float(saved["val_acc"][i]),
                                                         M.VAL_LOSS: float(saved["val_loss"][i]),
                                                         M.EPOCH: int(saved["epoch"][i])},
                         f"#{i}", saved["val"][i], int(saved["freeze_depth"][i]), is_probe=bool(saved["is_probe"][i]))
             for i, name in enumerate(saved["names"])]
    return found, saved["test"]


def arms(path: Path) -> dict[str, dict[str, float]]:
    """Test accuracy (as images right), NLL and ECE of each arm, as `benchmarks.final_model` scores them."""
    saved = np.load(path)
    labels_val, labels_test = saved["labels_val"], saved["labels_test"]
    found, test = candidates(saved)
    index = {id(c): i for i, c in enumerate(found)}
    out = {}
    for arm in ARMS:
        if arm == "probe":
            members, log_p = 1, C.log_probs(test[index[id(next(c for c in found if c.is_probe))]])
        else:
            final = F.choose(found, labels_val, arm)
            members, log_p = len(final.members), arm_log_p(final, lambda c: test[index[id(c)]])
        scores = C.scores(log_p, labels_test)
        out[arm] = {"right": round(scores["acc"] * len(labels_test)), "of": len(labels_test),
                    "nll": scores["nll"], "ece": scores["ece"], "members": members}
    return out


def paired(rows: dict[str, dict[str, dict[str, float]]]) -> str:
    """Each arm's test NLL minus the probe's on the same run: its mean, the standard error of that
    mean, and on how many runs it is below / above: whether a gap is more than run-to-run noise."""
    lines = ["| arm minus probe | mean test NLL difference | standard error | runs below / above | images right |",
             "|---|---|---|---|---|"]
    for arm in ARMS[1:]:
        d = np.array([r[arm]["nll"] - r["probe"]["nll"] for r in rows.values()])
        right = sum(r[arm]["right"] - r["probe"]["right"] for r in rows.values())
        lines.append(f"| {arm} | {d.mean():+.4f} | {d.std(ddof=1) / np.sqrt(len(d)):.4f} | "
                     f"{int((d < 0).sum())} / {int((d > 0).sum())} | {right:+d} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(prog="benchmarks.final_model_offline", description=__doc__.split("\n")[0])
    p.add_argument("npz", nargs="+", help="files written by benchmarks.final_model --save-logits")
    p.add_argument("--json", help="also write the scores here")
    args = p.parse_args()
    rows = {Path(f).stem: arms(Path(f)) for f in args.npz}
    print("| run | " + " | ".join(ARMS) + " |\n|---|" + "---|" * len(ARMS))
    for name, scored in rows.items():
        print(f"| {name} | " + " | ".join(f"{s['right']}/{s['of']} / {s['nll']:.4f} / {s['ece']:.3f}"
                                        for s in scored.values()) + " |")
    means = {arm: (sum(r[arm]["right"] for r in rows.values()), sum(r[arm]["of"] for r in rows.values()),
                   np.mean([r[arm]["nll"] for r in rows.values()]), np.mean([r[arm]["ece"] for r in rows.values()]))
             for arm in ARMS}
    print(f"| mean ({len(rows)}) | " + " | ".join(f"{a}/{b} / {c:.4f} / {d:.3f}" for a, b, c, d in means.values()) + " |")
    if len(rows) > 1:
        print(paired(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
