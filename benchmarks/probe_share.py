"""What the fine-tuned trials add beside the probe fitted on mirror images, on hymenoptera re-splits'
saved logits, in a minute: the final model's rule (the probe alone unless the trials' ensemble is
significantly ahead of it on val) against the probe-ensemble mixes it replaced.

Each split's saved candidates (`benchmarks.final_model --save-logits`) get the probe the search now
fits (benchmarks.probe_mirror's mirror_fitted: val and test logits averaged over each crop and its
mirror) in place of the one they were saved with; the fine-tuned candidates' test logits are their
centre crops' (the saved ones; mirroring them moved the default's test NLL by at most 0.003 on
re-splits 0-4 and 20-24). Arms, each scored on the split's test part:
- probe: the mirror-fitted probe at temperature 1 (benchmarks.final_model's probe_mirror arm);
- rule: `tuning.app.final_model.choose(..., "ensemble")` as it is;
- share S: the ensemble if significantly ahead, else the probe at weight S and the ensemble the rest
  (S = 0.75 was the rule until 2026-12-06).

    python -m benchmarks.probe_share --data-root ../shared/datasets --splits 0-4,15-29
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.search import HERE, commit, versions

SHARES = (0.75, 0.9)
LOGITS = HERE / "results" / "logits"


def saved_logits(split: int) -> Path:
    """The newest saved candidates of a split: the mirror change's run where there is one."""
    for path in (LOGITS / "ad8300f" / f"hymenoptera-{split}-32x8.npz", LOGITS / f"hymenoptera-{split}-32x8.npz"):
        if path.is_file():
            return path
    raise SystemExit(f"no saved logits for hymenoptera split {split} under {LOGITS}")


def mixed(candidates: list, labels: np.ndarray, probe, share: float) -> list:
    """The mix the rule replaced: the probe at `share`, the trials' ensemble the rest (at most 5
    networks); the candidates calibrated already."""
    from tuning.app import final_model as F

    members = F.ensemble(candidates, labels, F.select(candidates, labels))
    if F.lead_p_value(members, probe, labels) < F.SIGNIFICANT:
        return members
    others = sorted([(c, w) for c, w in members if c is not probe], key=lambda m: -m[1])[: F.MAX_MEMBERS - 1]
    if not others:
        return members
    own = sum(w for c, w in members if c is probe)
    rest = sum(w for _, w in others)
    return [(probe, share + (1 - share) * own)] + [(c, (1 - share) * (1 - own) * w / rest) for c, w in others]


def split_scores(split: int, features: tuple[np.ndarray, np.ndarray, np.ndarray, list[str]]) -> dict[str, dict[str, float]]:
    import torch

    from benchmarks.final_model import stratified
    from benchmarks.final_model_offline import candidates
    from tuning.app import final_model as F
    from tuning.lib import calibration as C
    from tuning.lib.probe import fit_probe

    f, ff, y, names = features
    saved = np.load(saved_logits(split))
    labels_val, labels_test = saved["labels_val"], saved["labels_test"]
    part = np.array(stratified(list(y), (0.5, 0.2, 0.3), split))
    # the search lists a split's images by class, then file name
    tr, va, te = (np.array(sorted(np.where(part == k)[0], key=lambda i: (y[i], names[i]))) for k in range(3))
    if not ((y[va] == labels_val).all() and (y[te] == labels_test).all()):
        raise SystemExit(f"split {split}: the saved logits are not in this split's image order")
    f, ff, yt = torch.from_numpy(f), torch.from_numpy(ff), torch.from_numpy(y)
    head = fit_probe(torch.cat([f[tr], ff[tr]]), torch.cat([yt[tr], yt[tr]]), (f[va] + ff[va]) / 2, yt[va], 2)
    probe_val, probe_test = (((f[i] + ff[i]) / 2 @ head.weight.T + head.bias).numpy() for i in (va, te))
    found, test = candidates(saved)
    test = test.copy()
    k = next(i for i, c in enumerate(found) if c.is_probe)
    found[k].val_logits, test[k] = probe_val, probe_test
    for i, c in enumerate(found):
        c.checkpoint_path = f"#{i}"
    index = {id(c): i for i, c in enumerate(found)}

    def scored(members) -> dict[str, float]:
        log_p = C.mixture([C.log_probs(test[index[id(c)]], c.temperature) for c, _ in members], [w for _, w in members])
        s = C.scores(log_p, labels_test)
        return {"right": int(round(s["acc"] * len(labels_test))), "of": len(labels_test), "nll": s["nll"],
                "ece": s["ece"], "members": sum(w > 0 for _, w in members)}

    out = {"probe": scored([(found[k], 1.0)])}  # before calibration: at temperature 1, as the benchmark's arm
    out["rule"] = scored(F.choose(found, labels_val, "ensemble").members)  # calibrates every candidate
    for share in SHARES:
        out[f"share {share}"] = scored(mixed(found, labels_val, found[k], share))
    return out


def main() -> None:
    from benchmarks.probe_mirror import pooled_features

    p = argparse.ArgumentParser(prog="benchmarks.probe_share", description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default="../shared/datasets")
    p.add_argument("--splits", default="0-4,15-29", help="re-split seeds with saved logits: ranges, comma-separated")
    p.add_argument("--out", default=str(HERE / "results" / "probe_share.json"))
    args = p.parse_args()
    splits = [s for part in args.splits.split(",") for s in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)]
    src = Path(args.data_root) / "hymenoptera_data"
    names = [q.name for q, _ in sorted((q, q.parent.name) for q in src.glob("*/*/*") if q.is_file())]
    features = (*pooled_features(Path(args.data_root)), names)
    rows = {s: split_scores(s, features) for s in splits}
    arms = list(next(iter(rows.values())))
    Path(args.out).write_text(json.dumps({"commit": commit(), "versions": versions(), "splits": args.splits,
                                          "results": rows}, indent=2))
    print("test images right / NLL / ECE (members)\n| split | " + " | ".join(arms) + " |\n|---|" + "---|" * len(arms))
    for s, r in rows.items():
        print(f"| {s} | " + " | ".join(f"{r[a]['right']}/{r[a]['of']} / {r[a]['nll']:.4f} / {r[a]['ece']:.3f} ({r[a]['members']})"
                                      for a in arms) + " |")
    print("| arm minus probe | splits | mean test NLL difference | standard error | below / above | images right |\n|---|---|---|---|---|---|")
    for a in arms[1:]:
        for name, group in (("all", splits), ("0-4", [s for s in splits if s < 5]), ("15-29", [s for s in splits if s >= 15])):
            d = np.array([rows[s][a]["nll"] - rows[s]["probe"]["nll"] for s in group])
            if len(d) < 2:
                continue
            right = sum(rows[s][a]["right"] - rows[s]["probe"]["right"] for s in group)
            print(f"| {a} | {name} ({len(d)}) | {d.mean():+.4f} | {d.std(ddof=1) / np.sqrt(len(d)):.4f} | "
                  f"{int((d < 0).sum())} / {int((d > 0).sum())} | {right:+d} |")


if __name__ == "__main__":
    main()
