"""The linear probe with and without the mirror image, on hymenoptera re-splits, in a minute.

Every arm is a logistic-regression head on the pretrained network's pooled features of centre
crops (tuning.lib.probe: L2 and standardising chosen on val NLL), scored on the split's test part
at temperature 1, as benchmarks.final_model's probe arm:
- plain: fitted on the training crops, scored on the test crops (what every earlier table calls the probe);
- mirror_scored: the same head, its test logits averaged over each crop and its mirror;
- mirror_fitted: fitted on the training crops and their mirrors, chosen on val mirror-averaged,
  scored mirror-averaged (what the search's probe is since the mirror change).
The splits are benchmarks.final_model's (50/20/30, stratified, seeded by the split number).

    python -m benchmarks.probe_mirror --data-root ../shared/datasets --splits 0-4,15-29
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from benchmarks.final_model import stratified
from benchmarks.search import HERE, commit, versions

ARMS = ("plain", "mirror_scored", "mirror_fitted")


def pooled_features(data_root: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(features of centre crops, of their mirrors, labels) for every hymenoptera image, in
    benchmarks.final_model.hymenoptera's order."""
    import torch

    from tuning.lib.backbones import BACKBONES
    from tuning.lib.data.decode import decode
    from tuning.lib.data.transforms import Normalize, eval_batch, resize_for
    from tuning.lib.model import build_model

    src = data_root / "hymenoptera_data"
    files = sorted((p, p.parent.name) for p in src.glob("*/*/*") if p.is_file())
    classes = sorted({c for _, c in files})
    spec = BACKBONES.get("efficientnet_lite0")
    net = build_model("efficientnet_lite0", len(classes), spec.default_weights(), spec.num_stages).eval()
    norm = Normalize.for_mode(spec.mean, spec.std, "RGB")
    x = norm(eval_batch([decode(p, resize_for(224)) for p, _ in files], 224))
    with torch.no_grad():
        f = [torch.cat([net.frozen_features(v[i : i + 32]) for i in range(0, len(v), 32)]).numpy() for v in (x, x.flip(-1))]
    return f[0], f[1], np.array([classes.index(c) for _, c in files])


def scores(f: np.ndarray, ff: np.ndarray, y: np.ndarray, split: int) -> dict[str, dict[str, float]]:
    import torch

    from tuning.lib import calibration as C
    from tuning.lib.probe import fit_probe

    part = np.array(stratified(list(y), (0.5, 0.2, 0.3), split))
    tr, va, te = (np.where(part == k)[0] for k in range(3))
    f, ff, yt = torch.from_numpy(f), torch.from_numpy(ff), torch.from_numpy(y)
    plain = fit_probe(f[tr], yt[tr], f[va], yt[va], 2)
    fitted = fit_probe(torch.cat([f[tr], ff[tr]]), torch.cat([yt[tr], yt[tr]]), (f[va] + ff[va]) / 2, yt[va], 2)
    logits = {
        "plain": f[te] @ plain.weight.T + plain.bias,
        "mirror_scored": (f[te] + ff[te]) / 2 @ plain.weight.T + plain.bias,
        "mirror_fitted": (f[te] + ff[te]) / 2 @ fitted.weight.T + fitted.bias,
    }
    out = {}
    for arm, z in logits.items():
        s = C.scores(C.log_probs(z.numpy()), y[te])
        out[arm] = {"right": int(round(s["acc"] * len(te))), "of": len(te), "nll": s["nll"], "ece": s["ece"]}
    return out


def main() -> None:
    p = argparse.ArgumentParser(prog="benchmarks.probe_mirror", description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default="../shared/datasets")
    p.add_argument("--splits", default="0-4,15-29", help="re-split seeds: ranges, comma-separated")
    p.add_argument("--out", default=str(HERE / "results" / "probe_mirror.json"))
    args = p.parse_args()
    splits = [s for part in args.splits.split(",") for s in range(int(part.split("-")[0]), int(part.split("-")[-1]) + 1)]
    f, ff, y = pooled_features(Path(args.data_root))
    rows = {s: scores(f, ff, y, s) for s in splits}
    Path(args.out).write_text(json.dumps({"commit": commit(), "versions": versions(), "splits": args.splits,
                                          "results": rows}, indent=2))
    print("| split | " + " | ".join(ARMS) + " |\n|---|" + "---|" * len(ARMS))
    for s, r in rows.items():
        print(f"| {s} | " + " | ".join(f"{r[a]['right']}/{r[a]['of']} / {r[a]['nll']:.4f} / {r[a]['ece']:.3f}" for a in ARMS) + " |")
    for name, group in (("0-4", [s for s in splits if s < 5]), ("15-29", [s for s in splits if s >= 15]), ("all", splits)):
        if not group:
            continue
        mean = {a: np.mean([rows[s][a]["nll"] for s in group]) for a in ARMS}
        lower = {a: sum(rows[s][a]["nll"] < rows[s]["plain"]["nll"] for s in group) for a in ARMS[1:]}
        right = {a: sum(rows[s][a]["right"] for s in group) for a in ARMS}
        print(f"{name} ({len(group)} splits): mean test NLL " + ", ".join(f"{a} {mean[a]:.4f}" for a in ARMS)
              + "; below plain on " + ", ".join(f"{a} {lower[a]}" for a in ARMS[1:])
              + "; images right " + ", ".join(f"{a} {right[a]}" for a in ARMS))


if __name__ == "__main__":
    main()
