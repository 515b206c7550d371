"""Bad input: one line on stderr, exit code 2, no traceback, nothing written."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import make_image_folder


def run_cli(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    make_image_folder(root / "hymenoptera_data", {"train": 2, "val": 2})
    return root


@pytest.mark.parametrize("args, message", [
    (["nosuch"], "unknown experiment 'nosuch'; valid: hymenoptera"),
    (["hymenoptera", "--backbone", "vgg"], "unknown backbone 'vgg'; valid: efficientnet_lite0"),
    (["hymenoptera", "--samples", "0"], "--samples must be a positive integer"),
    (["hymenoptera", "--epochs", "-1"], "--epochs must be a positive integer"),
    (["hymenoptera", "--gpus-per-trial", "1"], "--gpus-per-trial 1 but Ray sees 0 GPU"),
    (["hymenoptera", "--gpus-per-trial", "-0.5"], "--gpus-per-trial must not be negative"),
    (["hymenoptera", "--cpus-per-trial", "512"], "--cpus-per-trial 512 must be in"),
    (["hymenoptera", "--weights", "/no/such.pth"], "weights file /no/such.pth not found"),
    ([], "name an experiment"),
])
def test_bad_run_arguments(tmp_path, data_root, args, message):
    out = run_cli("tuning.run", *args, "--data-root", str(data_root), "--storage", str(tmp_path / "runs"))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("tuning.run: error: ") and message in lines[-1], out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_data_root_says_where_to_put_the_folder(tmp_path):
    out = run_cli("tuning.run", "hymenoptera", "--data-root", str(tmp_path / "empty"), "--storage", str(tmp_path / "runs"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "put the 'hymenoptera_data' folder under" in out.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "runs").exists()


def test_predict_on_a_missing_export(tmp_path):
    out = run_cli("tuning.predict", str(tmp_path / "nothing"), str(tmp_path / "x.jpg"))
    assert out.returncode == 2 and "is not an export" in out.stderr and "Traceback" not in out.stderr


def test_list_names_experiments_and_backbones():
    out = run_cli("tuning.run", "--list")
    assert out.returncode == 0
    assert "hymenoptera" in out.stdout and "resnet50" in out.stdout and "efficientnet_lite0" in out.stdout
