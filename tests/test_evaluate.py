"""`tuning.evaluate`: the export scored on the run's val split gives the export's own val_acc, on a
labelled folder what predict says; the PNGs are real pictures; bad paths are one-line errors."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

import tuning
from tuning.evaluate import evaluate
from tuning.report import main as report_main


def picture(path) -> tuple[int, int]:
    with Image.open(path) as img:
        assert img.format == "PNG"
        pixels = np.asarray(img.convert("L"))
    assert pixels.std() > 5  # not a blank canvas
    return img.size


def test_val_split_accuracy_is_the_exports_val_acc(finished_export, tiny_root, tmp_path):
    meta = json.loads((finished_export / "model.json").read_text())
    scored, pngs = evaluate(finished_export, data_root=str(tiny_root), out=tmp_path / "eval")
    assert scored.images.tag == "val"  # tiny has no test split
    assert len(scored.probs) == 16 and scored.accuracy == meta["metrics"]["val_acc"]
    assert [p.name for p in pngs] == ["confusion_matrix.png", "misclassified.png"]
    assert all(picture(p)[0] > 200 for p in pngs)
    text = scored.report()
    assert f"accuracy {scored.accuracy:.4f}" in text and "precision" in text and "recall" in text
    assert "ants" in text and "bees" in text


def test_folder_agrees_with_predict(finished_export, tiny_root, tmp_path):
    folder = tiny_root / "tiny" / "val"
    out = subprocess.run([sys.executable, "-m", "tuning.evaluate", str(finished_export), str(folder),
                          "--out", str(tmp_path / "eval")], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr
    files = sorted(folder.rglob("*.*"))
    predicted = tuning.load(finished_export).predict(files)
    accuracy = np.mean([label == f.parent.name for f, (label, _) in zip(files, predicted)])
    assert f"16 images, accuracy {accuracy:.4f}" in out.stdout
    wrong = sum(label != f.parent.name for f, (label, _) in zip(files, predicted))
    assert picture(tmp_path / "eval" / "confusion_matrix.png")
    assert picture(tmp_path / "eval" / "misclassified.png")
    assert wrong == round(16 * (1 - accuracy))


@pytest.mark.parametrize("case, message", [
    ("no_export", "is not an export"),
    ("no_folder", "folder {tmp}/nowhere not found"),
    ("unknown_class", "has class folder(s) wasps that the export does not know"),
    ("out_is_a_file", "--out {tmp}/file is not a folder"),
])
def test_bad_paths_are_one_line_errors(cli, finished_export, tiny_root, tmp_path, case, message):
    export, folder, extra = str(finished_export), str(tiny_root / "tiny" / "val"), []
    if case == "no_export":
        export = str(tmp_path / "nothing")
    elif case == "no_folder":
        folder = str(tmp_path / "nowhere")
    elif case == "unknown_class":
        shutil.copytree(tiny_root / "tiny" / "val", tmp_path / "val")
        (tmp_path / "val" / "bees").rename(tmp_path / "val" / "wasps")
        folder = str(tmp_path / "val")
    else:
        (tmp_path / "file").write_text("keep me")
        extra = ["--out", str(tmp_path / "file")]
    out = cli("tuning.evaluate", export, folder, *extra)
    assert out.returncode == 2
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("tuning.evaluate: error: ") and message.format(tmp=tmp_path) in last, out.stderr
    if case == "out_is_a_file":
        assert (tmp_path / "file").read_text() == "keep me"


def test_report_adds_the_val_confusion_matrix(finished_run, tiny_root, capsys):
    report_main([str(finished_run), "--data-root", str(tiny_root)])
    assert f"wrote {finished_run / 'val_confusion_matrix.png'}" in capsys.readouterr().out
    picture(finished_run / "val_confusion_matrix.png")
