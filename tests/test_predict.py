"""`tuning.predict` on folders: recursive, batched (the batch size changes nothing), bad paths fail
in one line before anything is written."""
from __future__ import annotations


import pytest

import tuning
from tuning.app.predictor import image_files


def test_folders_are_listed_recursively(tmp_path):
    (tmp_path / "a" / "deep").mkdir(parents=True)
    for name in ("a/x.JPG", "a/deep/y.png", "a/notes.txt", "a/.hidden.jpg", "z.gif"):
        (tmp_path / name).write_bytes(b"")
    assert image_files([tmp_path / "a", tmp_path / "z.gif"]) == [tmp_path / "a/deep/y.png", tmp_path / "a/x.JPG", tmp_path / "z.gif"]


def test_batch_size_does_not_change_predictions(finished_export, tiny_root):
    files = image_files([tiny_root / "tiny" / "val"])
    predictor = tuning.load(finished_export)
    predictor.batch_size = 3
    small = predictor.predict(files)
    predictor.batch_size = 64
    large = predictor.predict(files)
    assert [label for label, _ in small] == [label for label, _ in large]
    assert max(abs(a - b) for (_, a), (_, b) in zip(small, large)) < 1e-5


@pytest.mark.parametrize("case, message", [
    ("missing", "{tmp}/nothing.jpg not found"),
    ("empty_folder", "folder {tmp}/empty holds no images"),
    ("csv_folder_missing", "--csv {tmp}/no/p.csv: folder {tmp}/no not found"),
])
def test_bad_paths(cli, finished_export, tiny_root, tmp_path, case, message):
    (tmp_path / "empty").mkdir()
    args = {"missing": [str(tmp_path / "nothing.jpg")], "empty_folder": [str(tmp_path / "empty")],
            "csv_folder_missing": [str(tiny_root / "tiny" / "val"), "--csv", str(tmp_path / "no" / "p.csv")]}[case]
    out = cli("tuning.predict", str(finished_export), *args)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"tuning.predict: error: {message.format(tmp=tmp_path)}"), out.stderr


def test_an_unreadable_file_among_images_costs_only_its_row(cli, finished_export, tiny_root, tmp_path):
    """One warning names it; the other images are labelled as without it, in the CSV too."""
    files = image_files([tiny_root / "tiny" / "val"])
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"\xff\xd8 truncated")
    alone = cli("tuning.predict", str(finished_export), *map(str, files))
    out = cli("tuning.predict", str(finished_export), str(broken), *map(str, files), "--csv", str(tmp_path / "p.csv"))
    assert out.returncode == 0, out.stderr
    assert out.stdout == alone.stdout and len(out.stdout.splitlines()) == len(files)
    assert f"warning: skipped 1 unreadable image(s): {broken}" in out.stderr
    assert str(broken) not in (tmp_path / "p.csv").read_text()
    only = cli("tuning.predict", str(finished_export), str(broken), str(broken))
    assert only.returncode == 2 and only.stderr.strip().splitlines() == [
        f"tuning.predict: error: none of the 2 images is readable ({broken}, ...)"]
