"""The final model: how it is chosen from the candidates' val logits, calibrated, souped and
ensembled, and that a combined export round-trips through everything that reads an export."""
from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

import tuning
from experiments import EXPERIMENTS, Experiment
from tests.conftest import make_image_folder
from tuning.app import final_model as F
from tuning.app.export import export
from tuning.lib import calibration as C
from tuning.lib.model import build_model
from tuning.report import format_final


def logits_for(labels: np.ndarray, margin: np.ndarray, classes: int = 3) -> np.ndarray:
    """Logits whose true class leads by `margin` per image (negative: wrong)."""
    z = np.zeros((len(labels), classes), dtype=np.float32)
    z[np.arange(len(labels)), labels] = margin
    return z


def cand(name: str, logits: np.ndarray, labels: np.ndarray, depth: int = 9, probe: bool = False) -> F.Candidate:
    log_p = C.log_probs(logits)
    return F.Candidate(name, {"freeze_depth": depth}, {"val_acc": C.accuracy(log_p, labels), "val_loss": C.nll(log_p, labels),
                                                     "epoch": 1}, f"/nowhere/{name}", logits, depth, is_probe=probe)


def test_a_saturated_tie_does_not_go_to_the_overconfident_candidate():
    """Every candidate gets all of val right, one with enormous margins (val NLL ~1e-9, as the
    trial whose export then scored 0.906 on shifted test images): the old rule takes it, select
    and the ensemble keep the probe, which the temperature cannot sharpen past its bound."""
    labels = np.arange(60) % 3
    rng = np.random.default_rng(0)
    probe = cand("probe", logits_for(labels, 3.0 + rng.normal(0, 0.5, 60)), labels, probe=True)
    sure = cand("sure", logits_for(labels, 25.0 + rng.normal(0, 1, 60)), labels, depth=0)
    mid = cand("mid", logits_for(labels, 4.0 + rng.normal(0, 0.5, 60)), labels, depth=4)
    candidates = [probe, sure, mid]
    assert F.choose(candidates, labels, "best_acc").lead is sure
    for method in ("select", "ensemble"):
        final = F.choose(candidates, labels, method)
        assert sure not in [c for c, _ in final.members], method
        assert final.lead is probe, method
    assert probe.temperature == 1.0 and sure.temperature >= 1.0  # all right on val: never sharpened


def test_one_more_val_image_with_a_meaningless_loss_does_not_win():
    """A candidate one image ahead on accuracy but confidently wrong elsewhere (val_loss 8.5 in
    issue 28's run) loses to the calibrated near-tie: accuracy within one image, NLL decides."""
    labels = np.arange(100) % 2
    margins = np.full(100, 2.0)
    margins[:6] = -1.0  # 94 right
    good = cand("good", logits_for(labels, margins, 2), labels, depth=5)
    wild = np.full(100, 40.0)
    wild[:5] = -40.0  # 95 right, wildly sure of the five it gets wrong
    lucky = cand("lucky", logits_for(labels, wild, 2), labels, depth=2)
    assert lucky.metrics["val_acc"] > good.metrics["val_acc"] and lucky.metrics["val_loss"] > 1.5
    assert F.choose([good, lucky], labels, "best_acc").lead is lucky
    assert F.choose([good, lucky], labels, "select").lead is good


def test_two_more_val_images_do_not_outweigh_val_nll():
    """select ranks on NLL, not accuracy first: a candidate two images ahead that barely separates
    the classes (94 right at margin 0.5) loses to one that ranks them well (92 right at margin 3,
    its 8 errors near the boundary). With accuracy first, as before, the first would win."""
    labels = np.arange(100) % 2
    ranks = np.full(100, 3.0)
    ranks[:8] = -0.2
    barely = np.full(100, 0.5)
    barely[:6] = -0.5
    good = cand("good", logits_for(labels, ranks, 2), labels, depth=4)
    ahead = cand("ahead", logits_for(labels, barely, 2), labels, depth=4)
    final = F.choose([good, ahead], labels, "select")
    assert ahead.calibrated["acc"] - good.calibrated["acc"] == pytest.approx(0.02)
    assert ahead.calibrated["sharpest_nll"] > good.calibrated["sharpest_nll"] + 0.05
    assert final.lead is good


def test_the_ensemble_adds_members_that_lower_val_nll_and_weights_sum_to_one():
    """Two candidates wrong on different images: their average is right on more of them."""
    labels = np.arange(90) % 3
    a, b = np.full(90, 1.5), np.full(90, 1.5)
    a[:20], b[20:40] = -1.0, -1.0
    ca, cb = cand("a", logits_for(labels, a), labels), cand("b", logits_for(labels, b), labels, depth=3)
    final = F.choose([ca, cb], labels, "ensemble")
    assert final.kind == "ensemble" and {c.trial_id for c, _ in final.members} == {"a", "b"}
    assert sum(w for _, w in final.members) == pytest.approx(1.0)
    assert final.val["nll"] < min(ca.calibrated["nll"], cb.calibrated["nll"])
    assert len(F.ensemble([ca, cb], labels, ca, max_members=1)) == 1


def test_an_ensemble_not_significantly_ahead_of_the_probe_leaves_the_probe_alone():
    """Two images more than the probe on 80 (McNemar p 0.25: the lucky best of many) is no evidence:
    the probe alone is exported, and the summary says why. Twenty more (p ~1e-6) is: the ensemble stands."""
    labels = np.arange(80) % 2
    probe_margins = np.full(80, 2.0)
    probe_margins[:4] = -1.0  # 76 right
    probe = cand("probe", logits_for(labels, probe_margins, 2), labels, probe=True)
    close = np.full(80, 3.0)
    close[2:4] = -1.0  # 78 right: fixes two of the probe's four errors
    tuned = cand("tuned", logits_for(labels, close, 2), labels, depth=4)
    final = F.choose([probe, tuned], labels, "ensemble")
    assert [(c.trial_id, w) for c, w in final.members] == [("probe", 1.0)] and final.kind == "single"
    assert final.lead_p == pytest.approx(0.25) and final.describe().endswith("not significantly ahead of the probe on val (p 0.25)")
    record = F.record(final, [probe, tuned])
    assert record["lead_p"] == pytest.approx(0.25) and "lead over the probe on val at p 0.25" in format_final(record)

    weak = np.full(80, 2.0)
    weak[:24] = -1.0  # 56 right
    probe = cand("probe", logits_for(labels, weak, 2), labels, probe=True)
    tuned = cand("tuned", logits_for(labels, close, 2), labels, depth=4)
    assert F.lead_p_value([(tuned, 1.0)], probe, labels) < 1e-4
    final = F.choose([probe, tuned], labels, "ensemble")
    assert [c.trial_id for c, _ in final.members] == ["tuned"] and "significantly" not in final.describe()


def test_a_probe_chosen_outright_is_not_put_to_the_test():
    labels = np.arange(40) % 2
    probe = cand("probe", logits_for(labels, np.full(40, 2.0), 2), labels, probe=True)
    worse = np.full(40, 2.0)
    worse[:6] = -1.0
    tuned = cand("tuned", logits_for(labels, worse, 2), labels, depth=3)
    final = F.choose([probe, tuned], labels, "ensemble")
    assert [c.trial_id for c, _ in final.members] == ["probe"] and final.lead_p is None


def test_the_temperature_lowers_val_nll_of_an_overconfident_model():
    labels = np.arange(200) % 2
    rng = np.random.default_rng(1)
    margins = rng.normal(1.0, 2.0, 200) * 6  # many wrong, all far too sure
    logits = logits_for(labels, margins, 2)
    t = C.fit_temperature(logits, labels)
    assert t > 2 and C.nll(C.log_probs(logits, t), labels) < C.nll(C.log_probs(logits), labels) - 0.1
    assert C.ece(C.log_probs(logits, t), labels) < C.ece(C.log_probs(logits), labels)


def test_a_temperature_below_one_needs_several_val_errors():
    """An underconfident model (small margins): NLL alone would sharpen it. With two val errors that
    is noise, and T stays 1; with many, the sharper temperature is measured, and taken."""
    labels = np.arange(200) % 2
    few = np.full(200, 0.5)
    few[:2] = -0.5
    assert C.fit_temperature(logits_for(labels, few, 2), labels) == 1.0
    assert C.sharpest_nll(C.log_probs(logits_for(labels, few, 2)), labels) < C.nll(C.log_probs(logits_for(labels, few, 2)), labels)
    many = np.full(200, 0.5)
    many[: 4 * C.MIN_ERRORS_TO_SHARPEN] = -0.5
    assert C.fit_temperature(logits_for(labels, many, 2), labels) < 0.9


def test_the_temperature_lowers_val_nll_on_a_folder_built_to_be_overconfident(ray_session, tmp_path):
    """Val's labels contradict train's (its ants filed as bees and its bees as ants): every fitted
    head is sure of them and wrong, however its L2 was chosen. The export's temperature, fitted on
    val, softens it: T > 1, and its val NLL is below the same network's raw val loss."""
    root = make_image_folder(tmp_path / "over", {"train": 12, "val": 10})
    val = root / "val"
    (val / "ants").rename(val / "swap")
    (val / "bees").rename(val / "ants")
    (val / "swap").rename(val / "bees")
    experiment = Experiment(name="over", dataset=f"folder:{root}", image_size=32, epochs=2, samples=2)
    with contextlib.redirect_stdout(io.StringIO()):
        result = tuning.search(experiment, storage=str(tmp_path / "runs"), final="select")
    record = F.load_record(Path(result.run_dir))
    lead = next(c for c in record["candidates"] if c["weight"] > 0)
    assert lead["temperature"] > 1.0
    assert lead["calibrated_val_nll"] < lead["val_loss"]
    assert record["val"]["nll"] == pytest.approx(lead["calibrated_val_nll"])


def test_the_soup_recomputes_batchnorm_statistics(tmp_path):
    """Averaged weights get BatchNorm statistics of their own, measured on training images,
    not the average of the members' statistics."""
    torch.manual_seed(0)
    base = build_model("efficientnet_lite0", 2, None).state_dict()
    members = []
    for i in range(2):
        net = build_model("efficientnet_lite0", 2, None, freeze_depth=6)
        net.load_state_dict(base)
        with torch.no_grad():
            for p in net.parameters():
                if p.requires_grad:
                    p.add_(torch.randn_like(p) * 0.2)
        torch.save({"model": net.state_dict()}, tmp_path / f"state{i}.pt")
        (tmp_path / f"m{i}").mkdir()
        shutil.move(tmp_path / f"state{i}.pt", tmp_path / f"m{i}" / "state.pt")
        members.append(F.Candidate(f"m{i}", {}, {"val_acc": 0.5, "val_loss": 0.7, "epoch": 1}, str(tmp_path / f"m{i}"),
                                   np.zeros((8, 2), np.float32), 6))
    x = torch.randn(24, 3, 32, 32)
    labels = np.arange(8) % 2
    data = F.SoupData(build=lambda: build_model("efficientnet_lite0", 2, None), train_x=x, val_x=x[:8], batch_size=24)
    F.calibrate(members, labels)
    model = data.build()
    averaged = F.average([F.state_of(c) for c in members])
    model.load_state_dict(averaged)
    F.recompute_batchnorm(model, x, 6, batch_size=24)
    bn = [m for m in model.stages[6].modules() if isinstance(m, torch.nn.BatchNorm2d)][0]
    name = next(n for n, m in model.named_modules() if m is bn)
    # the statistics of what reaches that BatchNorm in the souped network, by hand
    captured = {}
    hook = bn.register_forward_hook(lambda m, inp, out: captured.setdefault("x", inp[0].detach()))
    model.eval()
    with torch.no_grad():
        model(x)
    hook.remove()
    assert torch.allclose(bn.running_mean, captured["x"].mean((0, 2, 3)), atol=1e-4)
    assert not torch.allclose(bn.running_mean, averaged[f"{name}.running_mean"], atol=1e-3)
    soup = F.greedy_soup(members, labels, data)
    if soup.kind == "soup":  # both ingredients kept: the exported state carries the recomputed statistics
        assert torch.allclose(soup.soup_state[f"{name}.running_mean"], bn.running_mean, atol=1e-5)
    frozen = next(n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d) and n.startswith("stages.0."))
    assert torch.equal(model.state_dict()[f"{frozen}.running_mean"], averaged[f"{frozen}.running_mean"])  # pretrained, kept


def test_mirroring_averages_each_member_over_the_image_and_its_mirror(tmp_path):
    """`mirror` gives each member the mean of its centre and mirrored val logits and fits its
    temperature again; the probe's logits, mirror-averaged already, are kept; the candidates the
    choice was made from stay as they were; the export then predicts so."""
    torch.manual_seed(0)
    x, labels = torch.randn(12, 3, 32, 32), np.arange(12) % 2
    net = build_model("efficientnet_lite0", 2, None, freeze_depth=6)
    net.load_state_dict(build_model("efficientnet_lite0", 2, None).state_dict())
    (tmp_path / "t").mkdir()
    torch.save({"model": net.state_dict()}, tmp_path / "t" / "state.pt")
    with torch.no_grad():
        centre, mirrored = net.eval()(x).numpy(), net(x.flip(-1)).numpy()
    trial = F.Candidate("t", {}, {"val_acc": 0.5, "val_loss": 0.7, "epoch": 1}, str(tmp_path / "t"), centre, 6)
    probe_logits = logits_for(labels, np.full(12, 1.0), classes=2)
    probe = F.Candidate("probe", {}, {"val_acc": 1.0, "val_loss": 0.3, "epoch": 0}, str(tmp_path / "p"),
                        probe_logits, 9, is_probe=True, mirrored=True)
    final = F.Final("ensemble", "ensemble", [(probe, 0.75), (trial, 0.25)], {})
    F.calibrate([probe, trial], labels)
    F.mirror(final, labels, lambda: build_model("efficientnet_lite0", 2, None), x)
    (p, wp), (t, wt) = final.members
    assert final.mirror and (wp, wt) == (0.75, 0.25) and p.mirrored and t.mirrored
    assert np.array_equal(p.val_logits, probe_logits)  # not mirrored twice
    assert np.allclose(t.val_logits, (centre + mirrored) / 2, atol=1e-5) and not np.allclose(centre, mirrored, atol=1e-3)
    assert t.temperature == pytest.approx(C.fit_temperature((centre + mirrored) / 2, labels), rel=1e-6)
    assert np.array_equal(trial.val_logits, centre) and not trial.mirrored  # the candidate as chosen
    assert final.val == F.ensemble_scores(final.members, labels)
    # the classes the TensorBoard images show are the mirrored mixture's, as its val accuracy counts them
    mixed = C.mixture([C.log_probs((centre + mirrored) / 2, t.temperature), C.log_probs(probe_logits, p.temperature)], [wt, wp])
    assert np.array_equal(final.val_predicted(), mixed.argmax(1))
    assert (final.val_predicted() == labels).mean() == pytest.approx(final.val["acc"])
    assert "averaged with its mirror" in final.describe()


@pytest.fixture(scope="module")
def ensemble_run(finished_run, tmp_path_factory) -> Path:
    """A copy of the shared tiny run whose export is an ensemble of its probe and a trial,
    made by the export code from the run's own checkpoints."""
    run = tmp_path_factory.mktemp("ens") / "tiny"
    shutil.copytree(finished_run, run, symlinks=True)
    record = F.load_record(run)
    assert record is not None and record["candidates"], "the search wrote final.json with its candidates"
    spec = json.loads((run / "run.json").read_text())
    trial = next(c for c in record["candidates"] if c["trial_id"] != "probe")
    ckpts = sorted((run / f"trial_{trial['trial_id']}").glob("checkpoint_*"))
    probe_dir = run / "probe"
    members = [
        (F.Candidate("probe", {"freeze_depth": 5}, {"val_acc": 0.5, "val_loss": 0.7, "epoch": 0}, str(probe_dir),
                     np.zeros((1, 2), np.float32), len(build_model("efficientnet_lite0", 2, None).stages), is_probe=True,
                     temperature=0.9), 0.6),
        (F.Candidate(trial["trial_id"], {"freeze_depth": trial["freeze_depth"]}, {"val_acc": 0.5, "val_loss": 0.7, "epoch": 1},
                     str(ckpts[-1]), np.zeros((1, 2), np.float32), trial["freeze_depth"], temperature=1.4), 0.4),
    ]
    experiment = EXPERIMENTS.get("tiny")
    export(F.Final("ensemble", "ensemble", members, {"acc": 0.5, "nll": 0.7, "ece": 0.1}), experiment,
           spec.get("classes", ["ants", "bees"]), run)
    return run


def test_an_ensemble_export_round_trips(ensemble_run, tiny_root, cli, tmp_path):
    export_dir = ensemble_run / "best"
    meta = json.loads((export_dir / "model.json").read_text())
    assert meta["final"]["kind"] == "ensemble" and [m["trial_id"] for m in meta["final"]["members"]][0] == "probe"
    files = sorted((tiny_root / "tiny" / "val").rglob("*.*"))
    loaded = tuning.load(export_dir)
    probs = loaded.probabilities(loaded.decode(f) for f in files)
    assert probs.shape == (len(files), 2) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert loaded.predict(files) == [(loaded.classes[i], float(p.max())) for i, p in zip(probs.argmax(1), probs)]
    out = cli("tuning.predict", str(export_dir), str(files[0]))
    assert out.returncode == 0 and out.stdout.split("\t")[1] == loaded.predict(files[:1])[0][0]
    out = cli("tuning.evaluate", str(export_dir), "--data-root", str(tiny_root), "--out", str(tmp_path / "eval"))
    assert out.returncode == 0, out.stderr
    accuracy = float((probs.argmax(1) == np.array([loaded.classes.index(f.parent.name) for f in files])).mean())
    assert f"accuracy {accuracy:.4f}" in out.stdout
    out = cli("tuning.run", "tiny", "--data-root", str(tiny_root), "--storage", str(tmp_path / "runs"), "--samples", "1",
              "--epochs", "1", "--warm-start", str(ensemble_run))
    assert out.returncode == 0, out.stderr
    assert "final model: " in out.stdout


def test_the_search_records_its_candidates_and_report_shows_them(finished_run, tiny_root, cli):
    record = F.load_record(finished_run)
    meta = json.loads((finished_run / "best" / "model.json").read_text())
    assert record["method"] == "ensemble" and record["candidates"][0]["trial_id"] == "probe"
    chosen = {c["trial_id"] for c in record["candidates"] if c["weight"] > 0}
    assert chosen == {m["trial_id"] for m in meta["final"]["members"]}
    assert all(c["temperature"] > 0 and c["calibrated_val_nll"] is not None for c in record["candidates"])
    assert meta["metrics"]["val_loss"] == pytest.approx(record["val"]["nll"])
    out = cli("tuning.report", str(finished_run))
    assert out.returncode == 0, out.stderr
    assert "final model" in out.stdout and "calibrated val NLL" in out.stdout
    for c in record["candidates"][:3]:
        assert c["trial_id"] in out.stdout
    # the tiny experiment flips its training views: the export averages each image with its mirror,
    # and its recorded val scores are what the exported model gives on val
    assert record["mirror"] and meta["final"]["mirror"] and "averaged with its mirror" in out.stdout
    predictor = tuning.load(finished_run / "best")
    val = sorted(p for p in (tiny_root / "tiny" / "val").rglob("*") if p.is_file())
    labels = np.array([predictor.classes.index(p.parent.name) for p in val])
    probs = predictor.probabilities(predictor.decode(p) for p in val)
    assert -np.log(probs[np.arange(len(val)), labels]).mean() == pytest.approx(meta["metrics"]["val_loss"], abs=1e-3)


def test_saved_logits_are_scored_again_per_arm(tmp_path):
    """benchmarks.final_model_offline: each arm is scored on the test logits of the candidates it
    chose, in the saved order (the overconfident 'sure' for best_acc, the probe for select)."""
    from benchmarks.final_model_offline import arms

    labels = np.arange(60) % 3
    rng = np.random.default_rng(0)
    val = [logits_for(labels, 3.0 + rng.normal(0, 0.5, 60)), logits_for(labels, 25.0 + rng.normal(0, 1, 60))]
    test_margins = np.full(60, 2.0)
    test_margins[:6] = -2.0  # the probe: 54 of 60 right on test
    sure_margins = np.full(60, 30.0)
    sure_margins[:12] = -30.0  # 'sure': 48 right, wildly sure of its mistakes
    test = [logits_for(labels, test_margins), logits_for(labels, sure_margins)]
    path = tmp_path / "run.npz"
    np.savez(path, names=np.array(["probe@0", "sure@1"]), labels_val=labels, labels_test=labels,
             val=np.stack(val), test=np.stack(test), freeze_depth=np.array([9, 0]), is_probe=np.array([True, False]),
             val_acc=np.array([1.0, 1.0]), epoch=np.array([0, 1]),
             val_loss=np.array([C.nll(C.log_probs(v), labels) for v in val]))
    scored = arms(path)
    assert scored["probe"]["right"] == 54 and scored["probe"]["nll"] == pytest.approx(C.nll(C.log_probs(test[0]), labels))
    assert scored["best_acc"]["right"] == 48 and scored["best_acc"]["nll"] > 5
    assert scored["select"]["right"] == 54 and scored["ensemble"]["members"] == 1


def test_a_failing_benchmark_search_reports_its_last_stderr_line(tmp_path, capfd):
    """benchmarks.final_model.child: a search process that dies leaves its cause in the results
    file (the error line) as well as on the console."""
    from benchmarks.final_model import child

    missing = tmp_path / "no-such-folder"
    result, error, _ = child("ours", "mine", missing, 1, 1, 0, tmp_path)
    assert result is None
    assert error.startswith("ours search exited with 1: ") and "no-such-folder" in error
    assert "Traceback" in capfd.readouterr().err


def test_the_offline_scorer_pairs_each_arm_with_the_probe_of_the_same_run():
    """benchmarks.final_model_offline.paired: differences are taken run by run, not of the means."""
    from benchmarks.final_model_offline import paired

    def run(probe: float, ensemble: float) -> dict[str, dict[str, float]]:
        arm = lambda nll, right: {"nll": nll, "right": right}  # noqa: E731
        return {"probe": arm(probe, 10), "best_acc": arm(probe + 1, 9), "select": arm(probe, 10), "ensemble": arm(ensemble, 11)}

    table = paired({"a": run(0.10, 0.08), "b": run(0.30, 0.31), "c": run(0.20, 0.17)})
    line = next(l for l in table.splitlines() if l.startswith("| ensemble"))
    assert line == "| ensemble | -0.0133 | 0.0120 | 2 / 1 | +3 |"
