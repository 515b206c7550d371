"""The search's anytime mechanisms: the linear probe trials start from, the floor the export
never falls below, and ASHA judging trials by compute spent."""
from __future__ import annotations

import copy
import dataclasses
import json
import pickle
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import torch

from experiments import EXPERIMENTS, Experiment
from tests.conftest import make_image_folder
from trainables.finetune import initial_head, train_one_epoch
from tuning.app import probing
from tuning.app.api import load_data
from tuning.app.results import RESULTS_FILE
from tuning.app.search import Placement, feature_cache, make_scheduler
from tuning.lib.backbones import BACKBONES
from tuning.lib import metrics as M
from tuning.lib.checkpoint import Feed, load_state
from tuning.lib.cost import epoch_costs, rung_pauses, rungs, steps_per_epoch
from tuning.lib.footprint import measure
from tuning.lib.probe import fit_probe

LITE0 = "efficientnet_lite0"


def lite0_weights() -> Path:
    return BACKBONES.get(LITE0).default_weights()


@pytest.mark.parametrize("hflip", [False, True], ids=["no-flip", "flip"])
def test_the_probe_is_a_fit_on_the_shared_cached_features(tiny_root, tiny_experiment, hflip):
    """Its features are the cached ones trials share. An experiment that trains on mirrored views
    fits the probe on the mirror images too and scores it on val mirror-averaged, as the final
    model predicts."""
    experiment = dataclasses.replace(tiny_experiment, hflip=hflip)
    handle, data = load_data(experiment, str(tiny_root))
    cache = feature_cache(experiment, Placement(), handle, lite0_weights())
    result, model = probing.fit(experiment, data, lite0_weights(), cache)
    depth = BACKBONES.get(LITE0).num_stages
    views = ("train-centre", "val") + (("train-centre-mirror", "val-mirror") if hflip else ())
    entries = {v: cache.entry(depth, v) for v in views}
    assert all(p.is_file() for p in entries.values()), entries  # shared with trials at full freeze
    x = {v: torch.from_numpy(np.load(p)) for v, p in entries.items()}
    train_y, val_y = torch.as_tensor(data.splits["train"].labels), torch.as_tensor(data.splits["val"].labels)
    plain = fit_probe(x["train-centre"], train_y, x["val"], val_y, len(data.classes))
    if hflip:
        again = fit_probe(torch.cat([x["train-centre"], x["train-centre-mirror"]]), torch.cat([train_y, train_y]),
                          (x["val"] + x["val-mirror"]) / 2, val_y, len(data.classes))
        assert not torch.allclose(again.weight, plain.weight, atol=1e-4)
        with torch.no_grad():  # its val logits are what the network with its head gives, mirror-averaged
            crops = model.eval()(x_val := _val_crops(experiment, data)), model(x_val.flip(-1))
        assert np.allclose(result.val_logits, ((crops[0] + crops[1]) / 2).numpy(), atol=1e-4)
    else:
        again = plain
    assert result.mirrored == hflip
    assert torch.equal(again.weight, result.probe.weight) and torch.equal(again.bias, result.probe.bias)
    assert torch.equal(model.head.weight, result.probe.weight)
    assert result.probe.val_acc == again.val_acc


def _val_crops(experiment: Experiment, data) -> torch.Tensor:
    from tuning.app.api import network_and_val

    return network_and_val(experiment, data)[1]


def test_the_probe_head_is_handed_to_the_trials_and_the_export_never_falls_below_it(ray_session, tmp_path, capsys):
    """A recipe that wrecks the pretrained features in one epoch (SGD at 3e-2, head x100, nothing
    frozen): the trial scores below the probe, so the probe is exported."""
    import cloudpickle

    import tests.recording
    import tuning

    cloudpickle.register_pickle_by_value(tests.recording)  # Ray's workers need not import tests/
    make_image_folder(tmp_path / "data" / "mine", {"train": 10, "val": 8})
    wreck = {"optimizer": "sgd", "lr": 3e-2, "head_lr_mult": 100.0, "freeze_depth": 0, "batch_size": 8,
             "weight_decay": 1e-6}
    experiment = Experiment(name="wreck", dataset=f"folder:{tmp_path / 'data' / 'mine'}", recipe=wreck)
    heads = tmp_path / "heads"
    result = tuning.search(experiment, samples=1, epochs=1, smoke_test=True, storage=str(tmp_path / "runs"),
                           trainable=tests.recording.recording(str(heads)))
    run_dir = Path(result.run_dir)
    probe = json.loads((run_dir / probing.PROBE_FILE).read_text())
    probe_head = load_state(run_dir / probing.PROBE_DIR)["model"]
    (received,) = [pickle.loads(p.read_bytes()) for p in heads.glob("*.pkl")]
    assert torch.equal(torch.tensor(received["weight"]), probe_head["head.weight"])
    meta = json.loads((run_dir / "best" / "model.json").read_text())
    table = pq.read_table(run_dir / RESULTS_FILE).to_pandas().set_index("trial_id")
    trial = table.drop(index=probing.PROBE_ID).iloc[0]
    assert trial.best_val_acc < probe["metrics"]["val_acc"], "the wrecking recipe did not score below the probe"
    assert meta["trial_id"] == probing.PROBE_ID and meta["metrics"]["val_acc"] == probe["metrics"]["val_acc"]
    assert result.best_trial_id == probing.PROBE_ID and result.best_val_acc == probe["metrics"]["val_acc"]
    assert table.loc[probing.PROBE_ID, "exported"] and not trial.exported
    assert f"linear probe: val_acc {probe['metrics']['val_acc']:.4f}" in capsys.readouterr().out
    assert len(result.predict([next((tmp_path / "data" / "mine" / "val").rglob("*.jpg"))])) == 1


def test_the_recipe_starts_from_the_head_its_experiment_names_and_every_other_trial_from_the_probes():
    probe_head = {"weight": np.ones((10, 1280), np.float32), "bias": np.zeros(10, np.float32)}
    mnist, hymenoptera = EXPERIMENTS.get("mnist"), EXPERIMENTS.get("hymenoptera")
    assert (mnist.recipe_head, hymenoptera.recipe_head) == ("random", "probe")
    assert initial_head(dict(mnist.recipe), mnist, probe_head) is None  # a fresh head, as the seeds
    assert initial_head(dict(hymenoptera.recipe), hymenoptera, probe_head) is probe_head
    for change in ({"lr": 3e-4}, {"freeze_depth": 9}, {"optimizer": "sgd"}):
        assert initial_head({**mnist.recipe, **change}, mnist, probe_head) is probe_head, change
    with pytest.raises(ValueError, match="recipe_head"):
        dataclasses.replace(mnist, recipe_head="zeros")


def test_epoch_costs_fall_with_depth_and_count_an_uncached_prefix():
    need = measure(LITE0, 64)
    cached, uncached = epoch_costs(need, 200, 100, True), epoch_costs(need, 200, 100, False)
    assert cached[0] == uncached[0] == 1.0
    assert all(a >= b for a, b in zip(cached, cached[1:])) and cached[-1] == 0.0
    # fully frozen without the cache: every epoch still runs the whole network forward
    assert uncached[-1] > 0.2 and all(u >= c for u, c in zip(uncached, cached))


def test_asha_judges_trials_after_equal_compute_not_equal_epochs():
    experiment = dataclasses.replace(EXPERIMENTS.get("hymenoptera"), epochs=8, grace_period=1 / 3, reduction_factor=3)
    scheduler = make_scheduler(experiment)
    cheap, good, poor = (SimpleNamespace(trial_id=n, config={}) for n in ("cheap", "good", "poor"))
    for trial in (cheap, good, poor):
        scheduler.on_trial_add(None, trial)

    def report(trial, epoch: int, per_epoch: float, acc: float) -> str:
        return scheduler.on_trial_result(None, trial, {"cost": epoch * per_epoch, "val_acc": acc, "epoch": epoch})

    # a deep trial (0.15 of a full epoch each) is first judged after 1/3 of one (epoch 3), then at 1 (epoch 7) ...
    assert [report(cheap, e, 0.15, 0.9) for e in range(1, 9)] == ["CONTINUE"] * 8
    assert scheduler._trial_info["cheap"]._rungs[-1][1] == {"cheap": 0.9}
    # ... and an expensive one is judged at its first epoch, against the cheap one's value at that compute
    assert report(poor, 1, 1.0, 0.7) == "STOP"
    assert report(good, 1, 1.0, 0.95) == "CONTINUE"
    assert report(good, 8, 1.0, 0.96) == "STOP"  # max_t: 8 full epochs of compute


def test_the_seeds_recipe_runs_all_its_epochs_while_it_improves_and_still_sets_the_bar():
    experiment = EXPERIMENTS.get("mnist")  # 3 epochs; the recipe is seed 000's Adam at 1e-3
    scheduler = make_scheduler(experiment)
    recipe = SimpleNamespace(trial_id="recipe", config=dict(experiment.recipe))
    head, other = (SimpleNamespace(trial_id=n, config={**experiment.recipe, "freeze_depth": 9}) for n in ("head", "other"))
    for trial in (head, other, recipe):
        scheduler.on_trial_add(None, trial)

    def report(trial, cost: float, acc: float) -> str:
        return scheduler.on_trial_result(None, trial, {"cost": cost, "val_acc": acc})

    assert report(head, 0.36, 0.92) == "CONTINUE"
    assert report(head, 1.07, 0.92) == "CONTINUE"
    # full fine-tuning dips in its first epoch: the recipe goes on where any other trial would stop ...
    assert report(recipe, 1.0, 0.70) == "CONTINUE"
    assert report(recipe, 2.0, 0.93) == "CONTINUE"
    assert report(recipe, 3.0, 0.97) == "STOP"  # ... up to max_t, like every trial
    # ... and its scores are in the rungs: 0.925 passes the head-only trial's 0.92 alone at rung 1/3,
    # not the top third of (0.92, and the recipe's 0.93 recorded there at its second epoch)
    assert scheduler._trial_info["recipe"]._rungs[-1][1] == {"head": 0.92, "recipe": 0.93}
    assert report(other, 0.5, 0.925) == "STOP"


def test_a_trial_stops_on_a_plateau_even_while_it_holds_the_search_best():
    experiment = EXPERIMENTS.get("hymenoptera")  # 8 epochs, patience 3 (or 1.5 epochs of compute), rungs at 1/3, 1, 3
    assert (experiment.epochs, experiment.patience, experiment.patience_cost) == (8, 3, 1.5)
    scheduler = make_scheduler(experiment)
    names = ("recipe", "deep", "shallow", "late", "leader", "depth2")
    recipe, deep, shallow, late, leader, depth2 = (SimpleNamespace(trial_id=n, config=dict(experiment.recipe)) for n in names)
    for trial in (deep, shallow, late, leader, depth2):
        trial.config["freeze_depth"] = 5  # not the recipe
        scheduler.on_trial_add(None, trial)
    scheduler.on_trial_add(None, recipe)

    def report(trial, epoch: float, correct: int) -> str:
        """Half a full epoch of compute per epoch (a deep trial: 0.01); every rung passed as the scores go."""
        per_epoch = {"recipe": 1.0, "deep": 0.01, "depth2": 0.97}.get(trial.trial_id, 0.5)
        return scheduler.on_trial_result(None, trial, {"cost": epoch * per_epoch, "val_acc": correct / 153, "epoch": epoch})

    # the recipe's scores in hymenoptera's 8 x 3 searches (benchmarks/README.md): it alone holds the
    # best, 146 at a rung inside its first epoch, then 145, 139-140: two whole epochs without a new
    # best cost 2 full epochs (>= 1.5), so it stops even while it leads
    assert [report(recipe, e, c) for e, c in ((0.375, 146), (1, 145))] == ["CONTINUE"] * 2
    assert report(recipe, 2, 140) == "STOP"
    assert [report(deep, e, 146) for e in (1, 2)] == ["CONTINUE"] * 2
    # half a full epoch per epoch: 146, 145; the rung report at 2.5 is no epoch; 143, 138: stopped at its fourth
    assert [report(shallow, e, c) for e, c in ((1, 146), (2, 145), (2.5, 146), (3, 143))] == ["CONTINUE"] * 4
    assert report(shallow, 4, 138) == "STOP"
    # a search's best came so: 146, 146, 145, then 147 at its fourth report: two stale epochs pass
    assert [report(late, e, c) for e, c in ((1, 146), (2, 146), (3, 145), (4, 147))] == ["CONTINUE"] * 4
    # a stale trial stops whether or not it holds the search's best: three whole epochs since its 148
    assert [report(leader, e, c) for e, c in ((1, 148), (2, 147), (3, 147))] == ["CONTINUE"] * 3
    assert report(leader, 4, 146) == "STOP"
    assert report(late, 5, 146) == "CONTINUE" and report(late, 6, 146) == "CONTINUE"
    assert report(late, 7, 145) == "STOP"  # three whole epochs since its 147
    # a depth-2 trial (0.97 per epoch): 146 at half an epoch, 145, 146 at a rung, then 143: two stale
    # epochs, 1.94 full epochs of compute (>= 1.5), so no third
    assert [report(depth2, e, c) for e, c in ((0.5, 146), (1, 145), (1.25, 146))] == ["CONTINUE"] * 3
    assert report(depth2, 2, 143) == "STOP"
    # a cheap deep trial is never stopped on a plateau: its epochs cost less than the first rung
    assert [report(deep, e, 146) for e in range(3, 9)] == ["CONTINUE"] * 6
    assert scheduler._num_stopped == 5
    with pytest.raises(ValueError, match="patience"):
        dataclasses.replace(experiment, patience=0)
    with pytest.raises(ValueError, match="patience_cost"):
        dataclasses.replace(experiment, patience_cost=0)


def test_start_up_trials_come_cheap_first_and_cover_every_depth():
    from tuning.app.search import make_searcher

    experiment = EXPERIMENTS.get("hymenoptera")
    searcher = make_searcher(experiment)
    depths = []
    for i in range(13):
        config = searcher.suggest(str(i))
        depths.append(config["freeze_depth"])
        searcher.on_trial_complete(str(i), {"val_acc": 0.5 + 0.01 * config["freeze_depth"]})
    stages = BACKBONES.get(LITE0).num_stages
    assert depths[0] == experiment.recipe["freeze_depth"]  # the recipe, enqueued
    # 9, 8, ..., 1: deepest (cheapest) first, the recipe's depth 0 not again
    assert depths[1:10] == list(range(stages, 0, -1))
    assert sorted(depths[:10]) == list(range(stages + 1))


def test_start_up_skips_whatever_depth_the_recipe_trains_at():
    from tuning.app.search import make_searcher

    hymenoptera = EXPERIMENTS.get("hymenoptera")
    experiment = dataclasses.replace(hymenoptera, recipe={**hymenoptera.recipe, "freeze_depth": 4})
    searcher = make_searcher(experiment)
    depths = [searcher.suggest(str(i))["freeze_depth"] for i in range(10)]
    assert depths == [4, 9, 8, 7, 6, 5, 3, 2, 1, 0]


def test_a_rung_inside_an_epoch_is_where_the_trial_reports():
    milestones = rungs(1 / 3, 3, 8)
    scheduler = make_scheduler(EXPERIMENTS.get("hymenoptera"))  # grace 1/3, reduction 3, 8 epochs
    assert milestones == sorted(m for m, _ in scheduler._brackets[0]._rungs)
    # depth 1 on hymenoptera: 0.984 of a full epoch each, 8 steps of 32 images; the first step at or past each rung
    assert rung_pauses(0.984, 0, milestones, 8) == [3]  # 3/8 x 0.984 = 0.369 >= 1/3 > 2/8 x 0.984
    assert rung_pauses(0.984, 1, milestones, 8) == [1]  # rung 1 a step into epoch 2, not at its end (1.97)
    assert rung_pauses(0.984, 2, milestones, 8) == []
    assert rung_pauses(1.0, 0, milestones, 8) == [3] and rung_pauses(1.0, 2, milestones, 8) == []  # 3.0: the epoch's end
    assert rung_pauses(0.366, 0, milestones, 8) == []  # rung 1/3 falls in the last step: the epoch's end judges it
    assert rung_pauses(0.0, 0, milestones, 8) == []
    assert steps_per_epoch(244, 32) == 8 and steps_per_epoch(17, 8) == 2 and steps_per_epoch(1, 8) == 1


class Linear(torch.nn.Module):
    """A trainable part without randomness, so a resumed epoch can be compared bit for bit."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)

    def trainable_forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x)


def test_a_trial_resumed_from_a_report_inside_an_epoch_trains_the_rest_of_that_epoch_only():
    x, y = torch.randn(20, 4, generator=torch.Generator().manual_seed(0)), torch.arange(20) % 2
    feed = Feed(y, lambda idx: x[list(idx)], cached=False)

    def epoch(model, first_step=0, pauses=(), pause=None):
        torch.manual_seed(7)  # the trainable seeds each epoch the same way, resumed or not
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        return train_one_epoch(model, optimizer, feed, 8, first_step=first_step, pauses=pauses, pause=pause)

    torch.manual_seed(1)
    whole, paused = Linear(), {}
    start = {k: v.clone() for k, v in whole.state_dict().items()}
    epoch(whole, pauses=[1], pause=lambda done, loss, rate: paused.update(done=done, state=copy.deepcopy(whole.state_dict())))
    assert paused["done"] == 1 and not torch.equal(paused["state"]["fc.weight"], start["fc.weight"])
    resumed = Linear()
    resumed.load_state_dict(paused["state"])
    epoch(resumed, first_step=1)
    for name, value in whole.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
    skipped = Linear()
    skipped.load_state_dict(paused["state"])
    epoch(skipped, first_step=3)  # past the last step: nothing left to train
    assert torch.equal(skipped.fc.weight, paused["state"]["fc.weight"])


def test_an_expensive_trial_is_judged_at_a_rung_inside_its_first_epoch(ray_session, tmp_path):
    """Full fine-tuning, 3 steps an epoch (20 images, batch 8), rungs at 1/3 and 1 epoch of compute:
    the first report comes a step into the first epoch, with the state to resume from there."""
    import tuning

    make_image_folder(tmp_path / "data" / "mine", {"train": 10, "val": 4})
    recipe = {"optimizer": "sgd", "lr": 1e-3, "head_lr_mult": 10.0, "freeze_depth": 0, "batch_size": 8, "weight_decay": 1e-6}
    experiment = Experiment(name="rungs", dataset=f"folder:{tmp_path / 'data' / 'mine'}", recipe=recipe, image_size=32,
                            epochs=2, samples=1, grace_period=1 / 3, reduction_factor=3)
    result = tuning.search(experiment, storage=str(tmp_path / "runs"))
    (trial_dir,) = Path(result.run_dir).glob("trial_*")
    progress = pd.read_csv(trial_dir / "progress.csv")
    assert progress[M.EPOCH].tolist() == [0.333, 1, 2]
    assert progress[M.COST].tolist() == pytest.approx([1 / 3, 1, 2])
    states = [load_state(c) for c in trial_dir.glob("checkpoint_*")]
    assert {(s["epoch"], s["steps"]) for s in states} <= {(0, 1), (1, 0), (2, 0)} and states
