"""The frozen-prefix feature cache: exact, computed once per entry, bounded, and used by searches."""
from __future__ import annotations

import multiprocessing
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn

from experiments.base import Experiment
from trainables.finetune import build_optimizer, train_one_epoch
from trainables.inputs import TrialInputs
from tuning.lib.backbones import BACKBONES
from tuning.lib.checkpoint import evaluate
from tuning.lib.data.decode import Dataset, Split
from tuning.lib.data.transforms import Normalize, TrainViews
from tuning.lib.features import FeatureCache
from tuning.lib.files import CACHE_ENV, seal_path
from tuning.lib.hparams import HParams
from tuning.lib.model import FineTuneNet, build_model

LITE0 = "efficientnet_lite0"


def random_dataset(n_train: int = 12, n_val: int = 6, size: int = 48) -> Dataset:
    rng = np.random.default_rng(0)

    def split(n: int) -> Split:
        return Split([rng.integers(0, 255, (size, size + 8, 3), dtype=np.uint8) for _ in range(n)], np.arange(n) % 2)

    return Dataset(["a", "b"], {"train": split(n_train), "val": split(n_val)})


def lite0(depth: int) -> FineTuneNet:
    torch.manual_seed(0)  # the same fresh head in both arms
    return build_model(LITE0, 2, BACKBONES.get(LITE0).default_weights(), depth)


@pytest.mark.parametrize("depth", [1, 3, 9])
def test_a_trial_fed_from_the_cache_gets_the_same_logits_and_loss(tmp_path, depth):
    """Arm A runs the frozen stages itself; arm B reads them from the cache (filled by a third
    model, as another trial would). Same logits, same losses, same weights after an epoch."""
    data = random_dataset()
    experiment = Experiment(name="x", dataset="x", image_size=32)
    norm = Normalize((0.5,) * 3, (0.5,) * 3)
    cache = FeatureCache("ns", 2**30, root=str(tmp_path))
    filler = lite0(depth)
    TrialInputs(data, experiment, filler, norm, cache, torch.device("cpu")).train(0)  # another trial fills it

    arms = {}
    for name, arm_cache in (("direct", None), ("cached", cache)):
        model = lite0(depth)
        inputs = TrialInputs(data, experiment, model, norm, arm_cache, torch.device("cpu"))
        train, val = inputs.train(0), inputs.val()
        # depth 1 (the stem) outputs more values than it takes in: not worth caching
        assert train.cached == (arm_cache is not None and depth > 1)
        model.eval()
        with torch.no_grad():
            logits = model.trainable_forward(train.batch([5, 0, 7]))
        hp = HParams(lr=0.01, head_lr_mult=10, freeze_depth=depth, batch_size=4)
        torch.manual_seed(1)
        train_loss, _ = train_one_epoch(model, build_optimizer(model, hp), train, hp.batch_size)
        arms[name] = (logits, train_loss, evaluate(model, val), model.state_dict())
    (la, ta, ea, sa), (lb, tb, eb, sb) = arms["direct"], arms["cached"]
    assert torch.equal(la, lb)
    assert ta == tb and ea == eb
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    assert cache.entry(depth, "train-e0").is_file() == cache.entry(depth, "val").is_file() == (depth > 1)


def epoch0_views():
    """Normalised epoch-0 training views of a random dataset's images, by index."""
    images = random_dataset().splits["train"].images
    views, norm = TrainViews(32), Normalize((0.5,) * 3, (0.5,) * 3)
    return lambda idx: norm(views.batch(images, list(idx), 0))


def test_a_deeper_entry_starts_from_a_shallower_one_exactly(tmp_path):
    raw = epoch0_views()
    cache = FeatureCache("ns", 2**30, root=str(tmp_path))
    cache.get(lite0(2), 2, "train-e0", 12, raw)
    assert cache.deepest_below(6, "train-e0")[0] == 2
    from_shallow = np.array(cache.get(lite0(6), 6, "train-e0", 12, raw))
    direct = lite0(6).frozen_features(raw(range(12))).numpy()
    assert np.array_equal(from_shallow, direct)


def test_a_deep_entry_leaves_the_shallower_ones_it_passed_exactly_as_they_would_be_computed(tmp_path):
    raw = epoch0_views()
    cache = FeatureCache("ns", 2**30, root=str(tmp_path))
    cache.get(lite0(9), 9, "train-e0", 12, raw, also=(4, 7))
    assert {p.name for p in tmp_path.glob("ns/*.npy")} == {"d4-train-e0.npy", "d7-train-e0.npy", "d9-train-e0.npy"}
    for depth in (4, 7):
        kept = np.load(cache.entry(depth, "train-e0"))
        assert np.array_equal(kept, lite0(depth).frozen_features(raw(range(12))).numpy()), depth
    # a cache with no room to spare keeps only what was asked for
    tight = FeatureCache("ns", int(np.load(cache.entry(9, "train-e0")).nbytes * 1.1), root=str(tmp_path / "tight"))
    tight.get(lite0(9), 9, "train-e0", 12, raw, also=(4, 7))
    assert {p.name for p in (tmp_path / "tight").glob("ns/*.npy")} == {"d9-train-e0.npy"}


class Counting(nn.Module):
    """A tiny frozen stage; every forward leaves a marker file, so computations can be counted."""

    def __init__(self, marker_dir: str) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.marker_dir = marker_dir

    def forward(self, x):
        Path(self.marker_dir, f"forward-{multiprocessing.current_process().pid}-{id(x)}").touch()
        return self.conv(x)


def tiny_net(marker_dir: str) -> FineTuneNet:
    torch.manual_seed(0)
    return FineTuneNet([Counting(marker_dir), nn.Conv2d(4, 4, 3, padding=1)], 4, 2).freeze(1)


def fetch_entry(root: str, marker_dir: str, barrier, out: str) -> None:
    def slow_inputs(idx):
        import time

        time.sleep(0.5)  # both processes are inside `get` at once
        return torch.ones(len(idx), 3, 8, 8)

    barrier.wait()
    features = FeatureCache("ns", 2**30, root=root).get(tiny_net(marker_dir), 1, "val", 10, slow_inputs, batch_size=10)
    np.save(out, np.asarray(features))


def test_two_trials_needing_one_entry_at_once_compute_it_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2)
    markers = tmp_path / "markers"
    markers.mkdir()
    procs = [ctx.Process(target=fetch_entry, args=(str(tmp_path / "cache"), str(markers), barrier, str(tmp_path / f"{i}.npy")))
             for i in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
        assert p.exitcode == 0
    assert len(list(markers.iterdir())) == 1  # one forward of the frozen stage, in one process
    assert np.array_equal(np.load(tmp_path / "0.npy"), np.load(tmp_path / "1.npy"))


def test_the_cache_stays_under_its_limit_and_evicts_the_least_recently_used(tmp_path):
    net = tiny_net(str(tmp_path))
    entry_bytes = 10 * 4 * 8 * 8 * 4 + 128  # float32 features + the .npy header
    cache = FeatureCache("ns", 2 * entry_bytes + 100, root=str(tmp_path / "cache"))

    def inputs(idx):
        return torch.rand(len(idx), 3, 8, 8)

    for epoch in range(4):
        assert cache.get(net, 1, f"train-e{epoch}", 10, inputs) is not None
        assert cache.used_bytes() <= cache.limit_bytes
    kept = sorted(p.name for p in (tmp_path / "cache" / "ns").glob("*.npy"))
    assert kept == ["d1-train-e2.npy", "d1-train-e3.npy"]
    # an entry larger than the whole limit is not cached: the trial computes as it goes
    assert cache.get(net, 1, "val", 100, inputs) is None
    assert cache.used_bytes() <= cache.limit_bytes


@pytest.mark.parametrize("damage", ["overwrite", "unsealed", "truncate"])
def test_a_damaged_entry_is_reported_once_and_computed_again(tmp_path, capsys, damage):
    """Bytes overwritten in place (same size, same header), a writer killed before the seal, a
    file cut short: the driver's check says so in one line and removes it; the next read computes
    exactly the clean values again. A trial's own read refuses it too."""
    net = tiny_net(str(tmp_path))
    cache = FeatureCache("ns", 2**30, root=str(tmp_path / "cache"))
    inputs = lambda idx: torch.linspace(0, 1, len(idx) * 3 * 8 * 8).reshape(len(idx), 3, 8, 8)  # noqa: E731
    clean = np.array(cache.get(net, 1, "val", 10, inputs))
    path = cache.entry(1, "val")

    def spoil() -> None:
        if damage == "overwrite":
            with path.open("r+b") as f:
                f.seek(path.stat().st_size - 40)
                f.write(b"\x7f" * 40)
        elif damage == "unsealed":
            seal_path(path).unlink()
        else:
            path.write_bytes(path.read_bytes()[:-40])

    spoil()
    assert cache.check() == [path]
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: feature cache entry {path} is damaged"), err
    assert not path.exists()
    assert np.array_equal(cache.get(net, 1, "val", 10, inputs), clean)
    assert cache.check() == [] and capsys.readouterr().err == ""

    spoil()  # damaged after the driver's check: the trial's read recomputes
    assert np.array_equal(cache.get(net, 1, "val", 10, inputs), clean)
    assert "is damaged" in capsys.readouterr().err
    assert cache.check() == []


def test_a_search_shares_the_cache_between_trials(finished_run):
    """The tiny search's trials with a frozen prefix read their features from the machine's cache;
    the dataset was decoded into exactly one store."""
    import os

    cache = Path(os.environ[CACHE_ENV])
    table = pd.read_parquet(finished_run / "results.parquet")
    depths = {int(d) for d, t in zip(table["hp_freeze_depth"], table["trial_id"]) if d > 0 and t != "probe"}
    assert depths, "the tiny search should have frozen some stages"
    entries = {p.name for p in (cache / "features").glob("*/d*-val.npy")}
    assert {f"d{d}-val.npy" for d in depths} <= entries
    assert len(list((cache / "store").glob("*.arrow"))) >= 1


def test_epochs_past_train_views_echo_the_first_views_and_the_cache_holds_only_those(tmp_path):
    """With 2 views, epoch 3 trains on epoch 1's crops (in a new order), and eight epochs at a
    cached depth leave only two epochs' features in the cache; without the bound, eight."""
    data = random_dataset()
    norm = Normalize((0.5,) * 3, (0.5,) * 3)
    for views, expected in ((2, {"train-e0", "train-e1"}), (None, {f"train-e{e}" for e in range(8)})):
        experiment = Experiment(name="x", dataset="x", image_size=32, train_views=views)
        cache = FeatureCache(f"ns{views}", 2**30, root=str(tmp_path))
        inputs = TrialInputs(data, experiment, lite0(9), norm, cache, torch.device("cpu"))
        feeds = [inputs.train(epoch) for epoch in range(8)]
        names = {p.name.split("-", 1)[1].removesuffix(".npy") for p in (tmp_path / f"ns{views}").glob("d9-train-*.npy")}
        assert names == expected
        same = torch.equal(feeds[3].batch([0, 5]), feeds[1].batch([0, 5]))
        assert same == (views == 2)
        assert not torch.equal(feeds[1].batch([0, 5]), feeds[0].batch([0, 5]))
        direct = TrialInputs(data, experiment, lite0(0), norm, None, torch.device("cpu"))
        assert torch.equal(direct.train(3).batch([2]), direct.train(1).batch([2])) == (views == 2)  # uncached too
    with pytest.raises(ValueError, match="train_views"):
        Experiment(name="x", dataset="x", train_views=0)
