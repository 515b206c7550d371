"""Every dataset in its real on-disk format: classes, split sizes, disjoint and seeded splits."""
from __future__ import annotations

import urllib.request

import numpy as np
import pytest

from tests.conftest import (
    BROKEN_FOLDERS,
    make_broken_folder,
    make_flat_folder,
    make_image_folder,
    make_mnist,
    write_idx,
)
from tuning.lib.data import mnist
from tuning.lib.data.decode import decode_listing, load
from tuning.lib.data.sources import create_source
from tuning.lib.errors import UsageError

HOTDOG = ("hotdog", "not-hotdog")
POKEMON = {"bulbasaur": 10, "charmander": 10, "mewtwo": 10, "pikachu": 10, "squirtle": 15}


def refs(listing, split: str) -> list[str]:
    return [item.ref for item in listing.splits[split]]


def check_disjoint(listing) -> None:
    seen: set[str] = set()
    for split in listing.splits:
        assert not seen & set(refs(listing, split)), split
        seen |= set(refs(listing, split))


@pytest.fixture(scope="module")
def hotdog_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("hotdog_root")
    make_image_folder(root / "hotdog", {"train": 10, "test": 4}, classes=HOTDOG)
    return root


def test_hotdog_holds_out_a_stratified_seeded_val_from_train(hotdog_root):
    source = create_source("hotdog")
    listing = source.list(hotdog_root, seed=0)
    assert listing.classes == list(HOTDOG)
    sizes = {k: np.bincount([i.label for i in v]).tolist() for k, v in listing.splits.items()}
    assert sizes == {"train": [8, 8], "val": [2, 2], "test": [4, 4]}
    check_disjoint(listing)
    assert all("/test/" in r for r in refs(listing, "test"))
    assert set(refs(listing, "train")) | set(refs(listing, "val")) == {
        str(p) for p in (hotdog_root / "hotdog" / "train").rglob("*.*")}
    again, other = source.list(hotdog_root, seed=0), source.list(hotdog_root, seed=1)
    assert refs(again, "val") == refs(listing, "val") and refs(again, "train") == refs(listing, "train")
    assert refs(other, "val") != refs(listing, "val")
    subset = source.list(hotdog_root, seed=0, per_class=1)  # after splitting: nothing changes sides
    assert set(refs(subset, "val")) <= set(refs(listing, "val")) and len(refs(subset, "val")) == 2


def test_pokemon_is_split_60_20_20_per_class_and_decodes_every_format(tmp_path, capsys):
    make_flat_folder(tmp_path / "pokemon", POKEMON)
    source = create_source("pokemon")
    listing = source.list(tmp_path, seed=0)
    assert listing.classes == sorted(POKEMON)
    sizes = {k: np.bincount([i.label for i in v]).tolist() for k, v in listing.splits.items()}
    assert sizes == {"train": [6, 6, 6, 6, 9], "val": [2, 2, 2, 2, 3], "test": [2, 2, 2, 2, 3]}
    check_disjoint(listing)
    assert sum(len(v) for v in listing.splits.values()) == sum(POKEMON.values())
    assert {p.suffix for p in listing.content} == {".jpg", ".jpeg", ".png"}
    for seed, same in ((0, True), (5, False)):
        other = source.list(tmp_path, seed=seed)
        assert (refs(other, "test") == refs(listing, "test")) == same
    data = decode_listing(listing, resize=36)
    assert all(a.shape[2] == 3 for s in data.splits.values() for a in s.images)  # alpha, palette -> RGB
    assert "skipped" not in capsys.readouterr().err


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_reads_real_idx_files_gzipped_or_not(tmp_path, gz):
    make_mnist(tmp_path, n_train=200, n_test=60, gz=gz)
    listing = create_source("mnist").list(tmp_path, seed=0)
    assert listing.classes == [str(d) for d in range(10)]
    assert {k: len(v) for k, v in listing.splits.items()} == {"train": 180, "val": 20, "test": 60}
    assert np.bincount([i.label for i in listing.splits["val"]]).tolist() == [2] * 10
    check_disjoint(listing)
    assert refs(listing, "test") == [f"test:{i}" for i in range(60)]
    assert refs(create_source("mnist").list(tmp_path, seed=0), "val") == refs(listing, "val")
    assert refs(create_source("mnist").list(tmp_path, seed=1), "val") != refs(listing, "val")
    raw = tmp_path / "MNIST" / "raw"
    assert sorted(p.name for p in listing.content) == sorted(p.name for p in raw.iterdir())
    data = decode_listing(listing, resize=28, mode="L")
    images = mnist.read_idx(str(next(raw.glob("train-images*"))))
    first = listing.splits["train"][0]
    assert data.splits["train"].images[0].shape == (28, 28, 1)
    assert np.array_equal(data.splits["train"].images[0][:, :, 0], images[int(first.ref.split(":")[1])])
    assert data.splits["train"].labels[0] == first.label


def test_mnist_reader_parses_each_file_once(tmp_path):
    make_mnist(tmp_path, n_train=50, n_test=20)
    mnist.read_idx.cache_clear()
    listing = create_source("mnist").list(tmp_path)
    decode_listing(listing, resize=28, mode="L")
    assert mnist.read_idx.cache_info().misses == 4  # 2 image files, 2 label files, for 70 images


def test_mnist_rejects_a_file_that_is_not_idx(tmp_path):
    make_mnist(tmp_path, n_train=20, n_test=10)
    (tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte.gz").unlink()
    write_idx(tmp_path / "MNIST" / "raw" / "t10k-images-idx3-ubyte", np.zeros(5, np.uint8))  # labels magic
    mnist.read_idx.cache_clear()
    with pytest.raises(UsageError, match="not an MNIST pair"):
        create_source("mnist").list(tmp_path)


def test_mnist_offline_says_where_to_put_the_files_and_leaves_nothing(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UsageError, match=r"MNIST/raw holds no MNIST idx files and downloading them through torchvision failed"):
        create_source("mnist").list(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_hotdog_offline_says_where_to_put_the_folder(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UsageError, match=f"hotdog.zip failed .*put the 'hotdog' folder under {tmp_path}"):
        create_source("hotdog").list(tmp_path)


def test_user_folder_with_splits_or_flat(tmp_path):
    make_image_folder(tmp_path / "split", {"train": 5, "val": 3, "test": 2}, classes=("cat", "dog"))
    listing = create_source(f"folder:{tmp_path / 'split'}").list(None)
    assert {k: len(v) for k, v in listing.splits.items()} == {"train": 10, "val": 6, "test": 4}
    make_image_folder(tmp_path / "no_val", {"train": 5}, classes=("cat", "dog"))
    listing = create_source(f"folder:{tmp_path / 'no_val'}").list(None, seed=3)
    assert {k: len(v) for k, v in listing.splits.items()} == {"train": 8, "val": 2}
    make_flat_folder(tmp_path / "flat", {"cat": 5, "dog": 5, "eel": 5})
    listing = create_source(f"folder:{tmp_path / 'flat'}").list(None)
    assert listing.classes == ["cat", "dog", "eel"]
    assert {k: len(v) for k, v in listing.splits.items()} == {"train": 9, "val": 3, "test": 3}
    check_disjoint(listing)


@pytest.mark.parametrize("breakage, message", BROKEN_FOLDERS)
def test_broken_user_folders_name_the_folder(tmp_path, breakage, message):
    base = make_broken_folder(tmp_path / "mine", breakage)
    with pytest.raises(UsageError) as info:
        load(create_source(f"folder:{base}"), tmp_path, resize=36)
    assert message.format(base=base) in str(info.value)


def test_unknown_dataset_lists_the_valid_names():
    with pytest.raises(UsageError, match="valid: hotdog, hymenoptera, mnist, pokemon"):
        create_source("cifar")
