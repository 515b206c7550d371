"""Finding, fetching and decoding datasets; the preprocessing shared by validation and predict."""
from __future__ import annotations

import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import make_image_folder
from tuning.lib.data import fetch
from tuning.lib.data.decode import load
from tuning.lib.data.sources import DATASETS, FolderSource
from tuning.lib.data.transforms import Normalize, eval_batch, eval_tensor, resize_for
from tuning.lib.errors import UsageError

SRC = FolderSource("set")


def test_load_decodes_every_format_and_skips_corrupt_files(tmp_path, capsys):
    make_image_folder(tmp_path / "set", {"train": 4, "val": 3})
    bad = tmp_path / "set" / "train" / "bees" / "truncated.jpg"
    bad.write_bytes((tmp_path / "set" / "train" / "bees" / "img3.jpg").read_bytes()[:100])
    data = load(SRC, tmp_path, resize=36)
    assert data.classes == ["ants", "bees"]
    assert len(data.splits["train"]) == 8 and len(data.splits["val"]) == 6
    assert all(a.ndim == 3 and a.shape[2] == 3 and min(a.shape[:2]) == 36 for a in data.splits["train"].images)
    assert any(p.endswith("img2 copy.jpg") for p in data.splits["train"].paths)
    err = capsys.readouterr().err
    assert "skipped 1 unreadable image" in err and "truncated.jpg" in err


def test_subset_keeps_per_class_counts(tmp_path):
    make_image_folder(tmp_path / "set", {"train": 5, "val": 5})
    data = load(SRC, tmp_path, resize=36, per_class=2)
    assert np.bincount(data.splits["val"].labels).tolist() == [2, 2]


@pytest.mark.parametrize("breakage, message", [
    ("one_class", "at least two"),
    ("empty_class", "holds no images"),
    ("val_classes_differ", "but train has"),
    ("all_unreadable", "no readable image"),
])
def test_broken_folders_are_usage_errors(tmp_path, breakage, message):
    make_image_folder(tmp_path / "set", {"train": 3, "val": 3}, classes=("a", "b"))
    base = tmp_path / "set"
    if breakage == "one_class":
        for split in ("train", "val"):
            for f in (base / split / "b").iterdir():
                f.unlink()
            (base / split / "b").rmdir()
    elif breakage == "empty_class":
        for f in (base / "val" / "b").iterdir():
            f.unlink()
    elif breakage == "val_classes_differ":
        (base / "val" / "b").rename(base / "val" / "c")
    elif breakage == "all_unreadable":
        for f in (base / "val" / "a").iterdir():
            f.write_bytes(b"garbage")
    with pytest.raises(UsageError, match=message):
        load(SRC, tmp_path, resize=36)


def test_absent_dataset_whose_download_fails_says_where_to_put_it(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(UsageError, match=f"put the 'hymenoptera_data' folder under {tmp_path}"):
        load(DATASETS.get("hymenoptera"), tmp_path, resize=36)
    assert list(tmp_path.iterdir()) == []  # a failed fetch leaves nothing behind


def test_download_is_checked_and_extracted(tmp_path, monkeypatch):
    import hashlib
    import io
    import zipfile

    make_image_folder(tmp_path / "src" / "set", {"train": 2, "val": 2})
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for f in (tmp_path / "src").rglob("*"):
            if f.is_file():
                zf.write(f, f.relative_to(tmp_path / "src"))
    payload = buf.getvalue()
    monkeypatch.setattr(urllib.request, "urlopen", lambda url, timeout: io.BytesIO(payload))
    root = tmp_path / "root"
    wrong = FolderSource("set", url="http://example.invalid/set.zip", sha1="0" * 40)
    with pytest.raises(UsageError, match="does not match"):
        load(wrong, root, resize=36)
    good = FolderSource("set", url="http://example.invalid/set.zip", sha1=hashlib.sha1(payload).hexdigest())
    assert len(load(good, root, resize=36).splits["train"]) == 4


def test_data_root_precedence(monkeypatch):
    monkeypatch.setenv(fetch.DATA_ROOT_ENV, "/from/env")
    assert fetch.resolve_data_root("/explicit") == Path("/explicit")
    assert fetch.resolve_data_root(None) == Path("/from/env")
    monkeypatch.delenv(fetch.DATA_ROOT_ENV)
    assert fetch.resolve_data_root(None) == Path("data")


def test_predict_preprocessing_is_validation_preprocessing(tmp_path):
    make_image_folder(tmp_path / "set", {"train": 2, "val": 2})
    data = load(SRC, tmp_path, resize=resize_for(32))
    norm = Normalize((0.5,) * 3, (0.5,) * 3)
    val = data.splits["val"]
    batch = norm(eval_batch(val.images, 32))
    for i, path in enumerate(val.paths):
        assert torch.equal(eval_tensor(path, 32, norm)[0], batch[i])


@pytest.mark.parametrize("mode, channels", [("RGB", 3), ("L", 1)])
def test_a_16_bit_grayscale_png_keeps_its_levels(tmp_path, mode, channels):
    """Pillow's own conversion clips 16-bit values at 255: a mid-grey scan became white."""
    from PIL import Image

    from tuning.lib.data.decode import decode

    levels = np.repeat(np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16), 8, axis=0).repeat(8, axis=1)
    Image.fromarray(levels).save(tmp_path / "scan.png")
    assert Image.open(tmp_path / "scan.png").mode == "I;16"
    pixels = decode(tmp_path / "scan.png", 8, mode)
    assert pixels.shape == (8, 32, channels)
    assert [int(pixels[4, x, 0]) for x in (2, 10, 18, 26)] == [0, 64, 128, 255]


def test_a_phone_photo_is_decoded_upright(tmp_path):
    """Phones store a portrait photo sideways with an EXIF Orientation tag; the user labelled it
    as a viewer shows it. Stored: left half black, right half white; tag 6 shows it turned 90
    degrees clockwise, so the black half is on top."""
    from PIL import Image

    from tuning.lib.data.decode import ORIENTATION, decode

    stored = np.zeros((40, 80, 3), dtype=np.uint8)
    stored[:, 40:] = 255
    photo = Image.fromarray(stored)
    exif = photo.getexif()
    exif[ORIENTATION] = 6
    photo.save(tmp_path / "portrait.jpg", exif=exif, quality=95)
    pixels = decode(tmp_path / "portrait.jpg", 40)
    assert pixels.shape == (80, 40, 3)
    assert pixels[10].mean() < 20 and pixels[70].mean() > 235
    photo.save(tmp_path / "plain.jpg", quality=95)
    assert decode(tmp_path / "plain.jpg", 40).shape == (40, 80, 3)
