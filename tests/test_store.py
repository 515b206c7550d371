"""Decode once: the memory-mapped store is keyed by content and size, and reused across runs."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tests.conftest import make_image_folder
from tuning.lib.data import decoded_store as store
from tuning.lib.data.decode import decode_listing
from tuning.lib.data.sources import FolderSource
from tuning.lib.data.transforms import TrainViews
from tuning.lib.files import seal_path

SRC = FolderSource("set")


@pytest.fixture
def folder(tmp_path):
    make_image_folder(tmp_path / "data" / "set", {"train": 4, "val": 3})
    return tmp_path / "data"


def test_store_holds_exactly_what_decoding_gives(folder, tmp_path):
    listing = SRC.list(folder)
    handle = store.build(listing, 36, "RGB", root=tmp_path / "cache")
    stored, decoded = store.open_store(handle.path), decode_listing(listing, 36)
    assert stored.classes == decoded.classes == ["ants", "bees"]
    for name in ("train", "val"):
        a, b = stored.splits[name], decoded.splits[name]
        assert a.paths == b.paths and np.array_equal(a.labels, b.labels)
        assert all(np.array_equal(x, y) for x, y in zip(a.images, b.images))
        assert not stored.splits[name].images[0].flags.writeable  # a view of the mapped file


def test_a_second_build_decodes_nothing(folder, tmp_path, monkeypatch):
    listing = SRC.list(folder)
    first = store.build(listing, 36, "RGB", root=tmp_path / "cache")

    def must_not_decode(*args, **kwargs):
        raise AssertionError("decoded again")

    monkeypatch.setattr(store, "decode_listing", must_not_decode)
    again = store.build(SRC.list(folder), 36, "RGB", root=tmp_path / "cache")
    assert again.path == first.path
    moved = folder.rename(tmp_path / "moved")  # content, not paths, is the key
    assert store.build(SRC.list(moved), 36, "RGB", root=tmp_path / "cache").key == first.key


def test_the_key_follows_content_size_and_mode(folder, tmp_path):
    listing = SRC.list(folder)
    key = store.store_key(listing, 36, "RGB")
    assert store.store_key(listing, 40, "RGB") != key
    assert store.store_key(listing, 36, "L") != key
    image = folder / "set" / "val" / "ants" / "img1.png"
    image.write_bytes((folder / "set" / "val" / "bees" / "img1.png").read_bytes())  # an edited image
    assert store.store_key(SRC.list(folder), 36, "RGB") != key


def test_a_store_hit_repeats_the_skipped_files_warning(folder, tmp_path, capsys):
    bad = folder / "set" / "train" / "bees" / "broken.jpg"
    bad.write_bytes(b"not a jpeg")
    store.build(SRC.list(folder), 36, "RGB", root=tmp_path / "cache")
    capsys.readouterr()
    store.build(SRC.list(folder), 36, "RGB", root=tmp_path / "cache")
    assert "skipped 1 unreadable image(s)" in capsys.readouterr().err


def test_training_views_are_fixed_by_seed_epoch_and_image():
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 255, (40, 50, 3), dtype=np.uint8) for _ in range(6)]
    views = TrainViews(32, seed=1)
    first = views.batch(images, [0, 1, 2, 3, 4, 5], epoch=0)
    assert first.shape == (6, 3, 32, 32)
    # the same image gets the same view whatever batch it lands in
    assert np.array_equal(views.batch(images, [5, 2], epoch=0), first[[5, 2]])
    assert not np.array_equal(views.batch(images, [0, 1, 2, 3, 4, 5], epoch=1), first)
    assert not np.array_equal(TrainViews(32, seed=2).batch(images, list(range(6)), epoch=0), first)
    no_flip = TrainViews(32, scale=(1.0, 1.0), ratio=(1.25, 1.25), hflip=False)
    assert np.array_equal(no_flip.batch(images, [0], 0), no_flip.batch(images, [0], 0))


@pytest.mark.parametrize("damage", ["truncate", "overwrite", "unsealed"])
def test_a_damaged_store_is_reported_once_and_decoded_again(folder, tmp_path, capsys, damage):
    listing = SRC.list(folder)
    path = Path(store.build(listing, 36, "RGB", root=tmp_path / "cache").path)
    clean = path.read_bytes()
    if damage == "truncate":  # a full disk, a copy cut short
        path.write_bytes(clean[: len(clean) // 2])
    elif damage == "overwrite":  # same size and header, other bytes
        with path.open("r+b") as f:
            f.seek(len(clean) // 2)
            f.write(b"\xff" * 64)
    else:  # its writer died between the file and its seal
        seal_path(path).unlink()
    capsys.readouterr()
    handle = store.build(listing, 36, "RGB", root=tmp_path / "cache")
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"warning: decoded store {path} is damaged"), err
    assert path.read_bytes() == clean
    assert store.open_store(handle.path).splits["train"].paths == listing_paths(listing, "train")
    store.build(listing, 36, "RGB", root=tmp_path / "cache")
    assert capsys.readouterr().err == ""  # sound again: no second warning


def listing_paths(listing, split: str) -> list[str]:
    return [item.ref for item in listing.splits[split]]


def test_a_trial_refuses_a_store_damaged_after_the_driver_checked_it(folder, tmp_path):
    handle = store.build(SRC.list(folder), 36, "RGB", root=tmp_path / "cache")
    Path(handle.path).write_bytes(Path(handle.path).read_bytes()[:100])
    store.open_store.cache_clear()
    with pytest.raises(RuntimeError, match="is damaged"):
        store.open_store(handle.path)
