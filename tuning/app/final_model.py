"""The final model, chosen after the search (and after --resume) from what it already computed:
every trial's kept checkpoints and the linear probe, each with its validation logits.

Accuracy on a few hundred validation images has few levels: most trials end within an image of
each other, and the maximum of many such noisy scores picks the luckiest, often an overconfident
one. So each candidate is first calibrated (a temperature fitted on val, tuning.lib.calibration),
and the methods judge candidates on calibrated NLL as well as accuracy:
- "select": one candidate. Those within one image's worth of NLL (ln 2 / n) of the lowest val NLL,
  each at its sharpest temperature (so that confidence alone decides nothing), tie; a tie goes to
  the candidate closest to the pretrained network (the probe, then the deepest freeze), never to
  the most confident. Accuracy, with its few levels, does not filter first.
- "ensemble" (default): greedy selection with replacement over the candidates' calibrated val
  probabilities (Caruana et al., 2004), starting from "select"'s choice, adding the candidate that
  lowers val NLL most, at most `MAX_MEMBERS` distinct, while the ensemble's NLL at its sharpest
  temperature drops by more than `MIN_GAIN`: a member must fix what confidence alone cannot, so on
  a val split already all right nothing is added for being surer. Unless the ensemble gets
  significantly more val images right than the probe (`lead_p_value`), the probe alone is the
  final model: the fine-tuned candidates' val scores are the best of many noisy ones, the probe's
  is not, and without that evidence a mix with them predicted held-out images no better than the
  calibrated probe, at twice its compute (docs/final-model.md).
- "soup": greedy weight averaging (Wortsman et al., 2022) in order of val score, an ingredient kept
  if the soup does not get worse on val; BatchNorm statistics are recomputed on training images.
- "best_acc": the rule before calibration: best val accuracy, lower val loss on ties.

Whatever is chosen, for an experiment that trains on mirrored views (`Experiment.hflip`) the final
model then averages each member's logits over the image and its left-right mirror (`mirror`): its
members' val logits are recomputed so, and their temperatures fitted again. The candidates are
chosen on the logits the search computed (the probe's are already mirror-averaged).
"""
from __future__ import annotations

import io
import json
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pyarrow.fs as pafs
import torch
from torch import nn

from tuning.lib import calibration as C
from tuning.lib import metrics as M
from tuning.lib.checkpoint import VAL_LOGITS_FILE, load_state
from tuning.lib.errors import UsageError
from tuning.lib.files import write_atomic
from tuning.lib.model import FineTuneNet

METHODS = ("ensemble", "select", "soup", "best_acc")
DEFAULT_METHOD = "ensemble"
MAX_MEMBERS = 5  # distinct networks in an ensemble: bounds its prediction cost
MAX_PICKS = 25  # greedy steps, as AutoGluon's ensemble selection
MIN_GAIN = 1e-3  # val NLL an added member must save: below it, a member is noise fitted to val
SIGNIFICANT = 0.05  # one-sided exact McNemar p-value an ensemble's lead over the probe must reach to stand alone
SOUP_INGREDIENTS = 8  # candidates a soup tries, best first: each try recomputes BatchNorm and validates
BN_IMAGES = 128  # training images that re-estimate a soup's BatchNorm statistics
FINAL_FILE = "final.json"


@dataclass
class Candidate:
    trial_id: str
    config: dict[str, Any]
    metrics: dict[str, Any]  # val_acc, val_loss, epoch, ... of the report the checkpoint belongs to
    checkpoint_path: str  # the folder holding state.pt
    val_logits: np.ndarray
    freeze_depth: int
    is_probe: bool = False
    mirrored: bool = False  # val_logits average the image's and its mirror's
    temperature: float = 1.0  # fitted on val by `calibrate`
    calibrated: dict[str, float] = field(default_factory=dict)  # acc, nll, ece at that temperature

    @property
    def name(self) -> str:
        return f"{self.trial_id}@{self.metrics.get(M.EPOCH, 0)}"

    def log_p(self) -> np.ndarray:
        return C.log_probs(self.val_logits, self.temperature)


@dataclass
class Final:
    method: str
    kind: str  # "single", "ensemble" or "soup"
    members: list[tuple[Candidate, float]]  # (candidate, weight); weights sum to 1
    val: dict[str, float]  # acc, nll, ece of the final model on val, calibrated
    seconds: float = 0.0
    soup_state: dict[str, torch.Tensor] | None = None  # the averaged weights, for a soup
    soup_temperature: float = 1.0
    candidates: list[Candidate] = field(default_factory=list)  # what it was chosen from (final.json)
    relative_cost: float | None = None  # its forward FLOPs per image over one network's (`prediction_cost`)
    mirror: bool = False  # each member's logits averaged over the image and its mirror (`mirror`)
    lead_p: float | None = None  # "ensemble": the trials' ensemble's lead over the probe on val, as `lead_p_value`

    @property
    def lead(self) -> Candidate:
        return max(self.members, key=lambda m: m[1])[0]

    def val_predicted(self) -> np.ndarray | None:
        """The class it predicts for each val image, from its members' calibrated val logits as its
        val scores are; None for a soup, whose averaged network is no candidate's."""
        if self.soup_state is not None:
            return None
        return mixed_log_p(self.members).argmax(1)

    def describe(self) -> str:
        names = ", ".join(f"{c.name}" + (f" x{w:.2f}" if len(self.members) > 1 else "") for c, w in self.members)
        what = {"single": "single", "ensemble": f"ensemble of {len(self.members)}", "soup": f"soup of {len(self.members)}"}[self.kind]
        if self.kind == "ensemble" and self.relative_cost is not None:
            what += f", {self.relative_cost:.2f}x one network's compute"
        if self.mirror:
            what += ", each image averaged with its mirror"
        why = ""
        if self.lead_p is not None and self.lead.is_probe and len(self.members) == 1:
            why = f"; the trials' ensemble was not significantly ahead of the probe on val (p {self.lead_p:.2g})"
        return (f"final model: {what} ({names}), chosen by {self.method}: val_acc {self.val['acc']:.4f}, "
                f"val NLL {self.val['nll']:.4f}, ECE {self.val['ece']:.4f} after calibration, {self.seconds:.1f} s{why}")


def prediction_cost(final: Final, stage_flops: Sequence[int]) -> float:
    """An ensemble's forward FLOPs per image over one network's: the pretrained prefix once, to
    the deepest member's depth, then each member's own stages (tuning.lib.ensemble); twice with `mirror`."""
    views = 2.0 if final.mirror else 1.0
    if final.kind != "ensemble" or not stage_flops:
        return views
    depths = [c.freeze_depth for c, _ in final.members]
    shared = sum(stage_flops[: max(depths)])
    return views * (shared + sum(sum(stage_flops[d:]) for d in depths)) / sum(stage_flops)


def read_logits(path: str, filesystem: pafs.FileSystem | None = None) -> np.ndarray | None:
    """A checkpoint's val logits, from a local folder or one in the run's storage (S3, ...)."""
    fs, folder = (filesystem, path) if filesystem is not None else pafs.FileSystem.from_uri(path) if "://" in path \
        else (pafs.LocalFileSystem(), path)
    try:
        with fs.open_input_stream(f"{folder}/{VAL_LOGITS_FILE}") as stream:
            return np.load(io.BytesIO(stream.read()))
    except (FileNotFoundError, OSError):
        return None  # a checkpoint written before logits were kept: not a candidate


def gather(grid: Any, probe: Candidate | None) -> list[Candidate]:
    """Every kept checkpoint of every trial with its val logits, and the probe, first."""
    found = [probe] if probe is not None else []
    for result in grid:
        trial_id = result.path.rstrip("/").rsplit("/", 1)[-1].removeprefix("trial_")
        for checkpoint, metrics in result.best_checkpoints or []:
            value = metrics.get(M.OBJECTIVE)
            if value is None or not math.isfinite(value):
                continue
            logits = read_logits(checkpoint.path, getattr(checkpoint, "filesystem", None))
            if logits is None:
                continue
            found.append(Candidate(
                trial_id=metrics.get("trial_id", trial_id), config=dict(result.config),
                metrics={k: metrics[k] for k in (M.VAL_ACC, M.VAL_LOSS, M.TRAIN_LOSS, M.EPOCH) if k in metrics},
                checkpoint_path=checkpoint.path, val_logits=logits,
                freeze_depth=int(result.config.get("freeze_depth", 0)),
            ))
    if not found:
        raise UsageError("no trial produced a checkpoint; see the errors above")
    return found


def calibrate(candidates: Sequence[Candidate], labels: np.ndarray) -> None:
    """Each candidate's temperature and scores at it; `sharpest_nll`, its NLL at whatever temperature
    suits it best, judges how well it ranks the val images whatever its confidence."""
    for c in candidates:
        c.temperature = C.fit_temperature(c.val_logits, labels)
        c.calibrated = {**C.scores(c.log_p(), labels), "sharpest_nll": C.sharpest_nll(C.log_probs(c.val_logits), labels)}


def best_acc(candidates: Sequence[Candidate]) -> Candidate:
    return max(candidates, key=lambda c: (c.metrics[M.VAL_ACC], -c.metrics[M.VAL_LOSS]))


def select(candidates: Sequence[Candidate], labels: np.ndarray) -> Candidate:
    """One candidate: the lowest val NLL at each one's sharpest temperature (so that confidence alone
    decides nothing); near-ties, within one image's worth (ln 2 / n), go to the least fine-tuned.
    Accuracy does not filter first: its few levels on a small val split reward the luckiest."""
    n = len(labels)
    lowest = min(c.calibrated["sharpest_nll"] for c in candidates)
    tied = [c for c in candidates if c.calibrated["sharpest_nll"] <= lowest + math.log(2) / n]
    return min(tied, key=lambda c: (not c.is_probe, -c.freeze_depth, c.calibrated["nll"]))


def ensemble(candidates: Sequence[Candidate], labels: np.ndarray, start: Candidate,
             max_members: int = MAX_MEMBERS) -> list[tuple[Candidate, float]]:
    """Greedy ensemble selection with replacement on calibrated val NLL, from `start`."""
    log_ps = [c.log_p() for c in candidates]
    picks = [candidates.index(start)]
    current = C.sharpest_nll(log_ps[picks[0]], labels)
    for _ in range(MAX_PICKS - 1):
        allowed = range(len(candidates)) if len(set(picks)) < max_members else sorted(set(picks))
        mixes = {j: C.mixture([log_ps[i] for i in picks + [j]], [1.0] * (len(picks) + 1)) for j in allowed}
        j = min(mixes, key=lambda j: C.nll(mixes[j], labels))
        value = C.sharpest_nll(mixes[j], labels)
        if current - value <= MIN_GAIN:
            break
        picks.append(j)
        current = value
    counts = {i: picks.count(i) for i in dict.fromkeys(picks)}
    return [(candidates[i], k / len(picks)) for i, k in counts.items()]


def lead_p_value(members: Sequence[tuple[Candidate, float]], probe: Candidate, labels: np.ndarray) -> float:
    """One-sided exact McNemar test (Dietterich, 1998): the chance of the ensemble being right on at
    least this many of the val images where it and the probe disagree, if neither were better."""
    ours = mixed_log_p(members).argmax(1) == labels
    theirs = probe.log_p().argmax(1) == labels
    wins, losses = int((ours & ~theirs).sum()), int((~ours & theirs).sum())
    n = wins + losses  # P(X >= wins) for X ~ Binomial(n, 1/2); exact, without scipy.stats' 0.5 s import
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n if n else 1.0


def probe_unless_ahead(members: list[tuple[Candidate, float]], probe: Candidate,
                       labels: np.ndarray) -> tuple[list[tuple[Candidate, float]], float]:
    """The ensemble if its lead over the probe on val is significant, else the probe alone; and the p-value."""
    p = lead_p_value(members, probe, labels)
    return (members if p < SIGNIFICANT else [(probe, 1.0)]), p


def mixed_log_p(members: Sequence[tuple[Candidate, float]]) -> np.ndarray:
    """Val log-probabilities of members mixed by weight, each at its fitted temperature."""
    return C.mixture([c.log_p() for c, _ in members], [w for _, w in members])


def ensemble_scores(members: Sequence[tuple[Candidate, float]], labels: np.ndarray) -> dict[str, float]:
    return C.scores(mixed_log_p(members), labels)


def choose(candidates: list[Candidate], labels: np.ndarray, method: str = DEFAULT_METHOD,
           soup_data: "SoupData | None" = None) -> Final:
    """The final model by `method` (see the module's docstring); `soup_data` is needed for "soup"."""
    if method not in METHODS:
        raise UsageError(f"unknown final-model method {method!r}; valid: {', '.join(METHODS)}")
    started = time.perf_counter()
    calibrate(candidates, labels)
    if method == "best_acc":
        one = best_acc(candidates)
        final = Final(method, "single", [(one, 1.0)], dict(one.calibrated))
    elif method == "select":
        one = select(candidates, labels)
        final = Final(method, "single", [(one, 1.0)], dict(one.calibrated))
    elif method == "ensemble":
        members, p = ensemble(candidates, labels, select(candidates, labels)), None
        probe = next((c for c in candidates if c.is_probe), None)
        if probe is not None and not (len(members) == 1 and members[0][0] is probe):  # the probe outright needs no test
            members, p = probe_unless_ahead(members, probe, labels)
        final = Final(method, "ensemble" if len(members) > 1 else "single", members, ensemble_scores(members, labels),
                      lead_p=p)
    else:
        if soup_data is None:
            raise ValueError("a soup needs the training and validation images")
        final = greedy_soup(candidates, labels, soup_data)
    final.seconds = time.perf_counter() - started
    return final


@dataclass
class SoupData:
    """What a soup needs beyond logits: a network to load states into, and the images."""

    build: Callable[[], FineTuneNet]  # the experiment's network, random head, unfrozen
    train_x: torch.Tensor  # normalised training crops for BatchNorm statistics
    val_x: torch.Tensor  # normalised validation crops
    batch_size: int = 16


def state_of(candidate: Candidate) -> dict[str, torch.Tensor]:
    return load_state(candidate.checkpoint_path)["model"]


@torch.no_grad()
def recompute_batchnorm(model: FineTuneNet, x: torch.Tensor, from_stage: int, batch_size: int = 16) -> None:
    """Re-estimate the running statistics of every BatchNorm in stages `from_stage`.. on `x`
    (averaged weights no longer match any member's statistics); earlier stages stay pretrained."""
    norms = [m for stage in model.stages[from_stage:] for m in stage.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    model.eval()
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over all batches
        m.train()
    for i in range(0, len(x), batch_size):
        model(x[i : i + batch_size])
    model.eval()


@torch.no_grad()
def logits_of(model: FineTuneNet, x: torch.Tensor, batch_size: int = 16) -> np.ndarray:
    model.eval()
    return torch.cat([model(x[i : i + batch_size]).float() for i in range(0, len(x), batch_size)]).numpy()


def average(states: Sequence[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    return {k: (sum(s[k].double() for s in states) / len(states)).to(states[0][k].dtype)
            if states[0][k].is_floating_point() else states[0][k] for k in states[0]}


def greedy_soup(candidates: list[Candidate], labels: np.ndarray, data: SoupData) -> Final:
    ranked = sorted(candidates, key=lambda c: (-c.calibrated["acc"], c.calibrated["nll"]))[:SOUP_INGREDIENTS]
    model = data.build()

    def cook(members: list[Candidate]) -> tuple[dict[str, float], dict[str, torch.Tensor], float]:
        state = average([state_of(c) for c in members])
        model.load_state_dict(state)
        if len(members) > 1:
            recompute_batchnorm(model, data.train_x, min(c.freeze_depth for c in members), data.batch_size)
        logits = logits_of(model, data.val_x, data.batch_size)
        t = C.fit_temperature(logits, labels)
        return C.scores(C.log_probs(logits, t), labels), {k: v.clone() for k, v in model.state_dict().items()}, t

    soup = [ranked[0]]
    scores, state, t = cook(soup)
    for c in ranked[1:]:
        trial_scores, trial_state, trial_t = cook(soup + [c])
        if (trial_scores["acc"], -trial_scores["nll"]) >= (scores["acc"], -scores["nll"]):
            soup, scores, state, t = soup + [c], trial_scores, trial_state, trial_t
    weight = 1.0 / len(soup)
    return Final("soup", "soup" if len(soup) > 1 else "single", [(c, weight) for c in soup], scores,
                 soup_state=state, soup_temperature=t)


def mirror(final: Final, labels: np.ndarray, build: Callable[[], FineTuneNet], val_x: torch.Tensor) -> None:
    """Make `final` average each image with its mirror: its members' (or its soup's) val logits
    become the mean of the centre crops' and their mirrors', its temperatures and val scores are
    fitted again. Costs one forward pass over the mirrored val crops per network not yet mirrored."""
    flipped = val_x.flip(-1)
    model = build() if final.soup_state is not None or not all(c.mirrored for c, _ in final.members) else None
    if final.soup_state is not None:
        model.load_state_dict(final.soup_state)
        logits = (logits_of(model, val_x) + logits_of(model, flipped)) / 2
        final.soup_temperature = C.fit_temperature(logits, labels)
        final.val = C.scores(C.log_probs(logits, final.soup_temperature), labels)
    else:
        members = []
        for c, w in final.members:  # copies: the candidates stay as they were chosen (final.json)
            if not c.mirrored:
                model.load_state_dict(state_of(c))
                c = replace(c, val_logits=(c.val_logits + logits_of(model, flipped)) / 2, mirrored=True)
            members.append((replace(c), w))
        calibrate([c for c, _ in members], labels)
        final.members, final.val = members, ensemble_scores(members, labels)
    final.mirror = True


def record(final: Final, candidates: Sequence[Candidate]) -> dict[str, Any]:
    """final.json: what the final model is and every candidate it was chosen from."""
    weights = {c.checkpoint_path: w for c, w in final.members}  # members may be mirrored copies
    return {
        "method": final.method, "kind": final.kind, "seconds": round(final.seconds, 3),
        "relative_cost": final.relative_cost, "mirror": final.mirror, "lead_p": final.lead_p,
        "val": final.val,
        "members": [{"trial_id": c.trial_id, "epoch": c.metrics.get(M.EPOCH, 0), "weight": w} for c, w in final.members],
        "candidates": [{
            "trial_id": c.trial_id, "epoch": c.metrics.get(M.EPOCH, 0), "freeze_depth": c.freeze_depth,
            "checkpoint": c.checkpoint_path,
            "val_acc": c.metrics.get(M.VAL_ACC), "val_loss": c.metrics.get(M.VAL_LOSS),
            "temperature": c.temperature, "calibrated_val_nll": c.calibrated.get("nll"), "mirrored": c.mirrored,
            "calibrated_val_ece": c.calibrated.get("ece"), "sharpest_val_nll": c.calibrated.get("sharpest_nll"),
            "weight": weights.get(c.checkpoint_path, 0.0),
        } for c in candidates],
    }


def save_record(final: Final, candidates: Sequence[Candidate], run_dir: Path) -> None:
    write_atomic(run_dir / FINAL_FILE, json.dumps(record(final, candidates), indent=2))


def load_record(run_dir: Path) -> dict[str, Any] | None:
    path = run_dir / FINAL_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def candidates_of(record: dict[str, Any]) -> list[Candidate]:
    """The candidates a run recorded in final.json, their logits read again (benchmarks use this)."""
    found = []
    for c in record["candidates"]:
        logits = read_logits(c["checkpoint"])
        if logits is not None:
            found.append(Candidate(c["trial_id"], {}, {M.VAL_ACC: c["val_acc"], M.VAL_LOSS: c["val_loss"], M.EPOCH: c["epoch"]},
                                   c["checkpoint"], logits, c["freeze_depth"], is_probe=c["trial_id"] == "probe",
                                   mirrored=bool(c.get("mirrored", False))))
    return found


def probe_candidate(probe: Any, run_dir: Path, probe_id: str, probe_dir: str) -> Candidate:
    """The linear probe as a candidate (tuning.app.probing.ProbeResult)."""
    return Candidate(
        trial_id=probe_id, config=dict(probe.config), metrics=dict(probe.metrics),
        checkpoint_path=str(run_dir / probe_dir), val_logits=probe.val_logits,
        freeze_depth=int(probe.freeze_depth), is_probe=True, mirrored=bool(getattr(probe, "mirrored", False)),
    )


__all__ = ["Candidate", "Final", "choose", "gather"]
