"""Bad input: one line on stderr, exit code 2, no traceback, nothing written."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tests.conftest import Ran, make_flat_folder, make_image_folder
from tuning.lib.allocator import jemalloc_path


def run_cli(*args: str, cwd=None, env=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, cwd=cwd, env=env)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("root")
    make_image_folder(root / "hymenoptera_data", {"train": 2, "val": 2})
    return root


@pytest.mark.parametrize("args, message", [
    (["nosuch"], "unknown experiment 'nosuch'; valid: hotdog, hymenoptera, mnist, pokemon"),
    (["hymenoptera", "--backbone", "vgg"], "unknown backbone 'vgg'; valid: efficientnet_lite0"),
    (["hymenoptera", "--samples", "0"], "--samples must be a positive integer"),
    (["hymenoptera", "--epochs", "-1"], "--epochs must be a positive integer"),
    (["hymenoptera", "--gpus-per-trial", "1"], "--gpus-per-trial 1 but Ray sees 0 GPU"),
    (["hymenoptera", "--gpus-per-trial", "-0.5"], "--gpus-per-trial must not be negative"),
    (["hymenoptera", "--cpus-per-trial", "512"], "--cpus-per-trial 512 must be in"),
    (["hymenoptera", "--weights", "/no/such.pth"], "weights file /no/such.pth not found"),
    (["hymenoptera", "--max-failures", "-1"], "--max-failures must not be negative"),
    (["hymenoptera", "--memory-gb", "0"], "--memory-gb must be positive, got 0"),
    (["hymenoptera", "--memory-gb", "8", "--address", "auto"], "--memory-gb sizes a Ray started here"),
    (["hymenoptera", "--step-memory-gb", "-1"], "--step-memory-gb must not be negative, got -1"),
    (["hymenoptera", "--resume"], "nothing to resume"),
    (["hymenoptera", "--name", "../elsewhere"], "--name '../elsewhere' must be one folder name under --storage"),
    (["hymenoptera", "--storage", "bogus://x/y"], "--storage bogus://x/y"),
    (["hymenoptera", "--time-budget", "soon"], "--time-budget 'soon' is not a duration; write it as 90s, 10m or 1h"),
    (["hymenoptera", "--time-budget", "10d"], "--time-budget '10d' is not a duration"),
    (["hymenoptera", "--time-budget", "0s"], "--time-budget must be positive"),
    (["hymenoptera", "--warm-start", "/no/such/run"], "--warm-start /no/such/run is not a run dir"),
    (["hymenoptera", "--warm-start", "/no/such/run", "--resume"], "--warm-start seeds a new search"),
    (["hymenoptera", "--backbone", "timm:nosuch_net"], "unknown timm model 'nosuch_net'"),
    (["hymenoptera", "--backbone", "timm:vit_tiny_patch16_224"], "cannot be cut into stages"),
    (["folder:/no/such/images"], "folder /no/such/images not found"),
    ([], "name an experiment"),
])
def test_bad_run_arguments(cli, tmp_path, data_root, args, message):
    if "--storage" not in args:
        args = [*args, "--storage", str(tmp_path / "runs")]
    out = cli("tuning.run", *args, "--data-root", str(data_root))
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert lines[-1].startswith("tuning.run: error: ") and message in lines[-1], out.stderr
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "runs").exists()


def test_missing_data_root_says_where_to_put_the_folder(cli, tmp_path):
    out = cli("tuning.run", "hymenoptera", "--data-root", str(tmp_path / "empty"), "--storage", str(tmp_path / "runs"))
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "put the 'hymenoptera_data' folder under" in out.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "runs").exists()


def test_data_that_cannot_be_listed_starts_no_ray_and_a_search_leaves_its_ray_up(tmp_path):
    """The API lists the data before Ray starts: a broken folder is answered without Ray's start
    and stop (about ten seconds here). Then a search in the same notebook-like process starts its
    own Ray, though this machine records another one's address (as `ray start` and a test's
    ray.cluster_utils.Cluster do: a bare ray.init() joined it, with a traceback), and leaves it up
    for the next one (only the command stops it), its workers preloaded with jemalloc
    (tuning.lib.allocator). A fresh interpreter, so that no test's Ray is running."""
    make_flat_folder(tmp_path / "one", {"a": 5})
    good = make_image_folder(tmp_path / "good", {"train": 4, "val": 2})
    code = ("import ray, tuning\n"
            "try:\n"
            f"    tuning.search('folder:{tmp_path / 'one'}', storage='{tmp_path / 'runs'}')\n"
            "except tuning.UsageError as err:\n"
            "    print('usage error:', err)\n"
            "print('ray started:', ray.is_initialized())\n"
            f"tuning.search('folder:{good}', smoke_test=True, samples=1, epochs=1, storage='{tmp_path / 'ok'}')\n"
            "print('ray after a search:', ray.is_initialized())\n"
            "import ctypes\n"
            "@ray.remote(num_cpus=1)\n"
            "def allocator():\n"
            "    decay, size = ctypes.c_ssize_t(0), ctypes.c_size_t(8)\n"
            "    mallctl = getattr(ctypes.CDLL(None), 'mallctl', None)\n"
            "    mallctl and mallctl(b'opt.dirty_decay_ms', ctypes.byref(decay), ctypes.byref(size), None, ctypes.c_size_t(0))\n"
            "    return 'jemalloc' in open('/proc/self/maps').read(), decay.value\n"
            "print('worker allocator:', ray.get(allocator.remote()))\n")
    # Ray's temp dir (sockets included) where no other Ray is, under a path short enough for a socket
    ray_tmp = Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))
    (ray_tmp / "ray").mkdir()
    (ray_tmp / "ray" / "ray_current_cluster").write_text("127.0.0.1:1")  # no cluster there
    try:
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                             env={**os.environ, "RAY_TMPDIR": str(ray_tmp)})
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert "usage error: " in out.stdout and "has 1 class" in out.stdout, out.stdout + out.stderr
    assert "ray started: False" in out.stdout
    assert not (tmp_path / "runs").exists()
    assert "ray after a search: True" in out.stdout, out.stdout[-2000:] + out.stderr[-2000:]
    if jemalloc_path() is not None:  # Linux, and Ray ships its jemalloc
        assert "worker allocator: (True, -1)" in out.stdout, out.stdout[-2000:]


def test_predict_on_a_missing_export(cli, tmp_path):
    out = cli("tuning.predict", str(tmp_path / "nothing"), str(tmp_path / "x.jpg"))
    assert out.returncode == 2 and "is not an export" in out.stderr and "Traceback" not in out.stderr


def test_list_names_experiments_and_backbones(cli):
    out = cli("tuning.run", "--list")
    assert out.returncode == 0
    assert "hymenoptera" in out.stdout and "resnet50" in out.stdout and "efficientnet_lite0" in out.stdout
    assert "timm:NAME" in out.stdout


def test_timm_backbone_offline_without_cached_weights(tmp_path, data_root):
    """Never random weights silently, and no minute of retries: one line, exit 2."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf")}
    out = run_cli("tuning.run", "hymenoptera", "--backbone", "timm:resnet10t", "--data-root", str(data_root),
                  "--storage", str(tmp_path / "runs"), env=env)
    one_line_error(out, "tuning.run", "no pretrained weights for timm:resnet10t: timm/resnet10t.c3_in1k is not in "
                   "the Hugging Face cache and HF_HUB_OFFLINE is set; pass --weights FILE")
    assert not (tmp_path / "runs").exists()


def one_line_error(out: subprocess.CompletedProcess | Ran, prog: str, message: str) -> None:
    assert out.returncode == 2, out.stderr[-2000:]
    assert "Traceback" not in out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith(f"{prog}: error: ") and message in last, out.stderr[-2000:]


def test_unwritable_storage(cli, tmp_path, data_root):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    out = cli("tuning.run", "hymenoptera", "--data-root", str(data_root), "--storage", str(blocker / "runs"))
    one_line_error(out, "tuning.run", "is not writable")
    assert blocker.read_text() == "not a folder"


@pytest.mark.parametrize("storage", ["/proc/nope", "/proc/self/fd/nope/runs"])
def test_storage_the_filesystem_refuses(cli, storage, tmp_path, data_root):
    """/proc lets root pass os.access but refuses any new file: one line, exit 2, nothing written."""
    out = cli("tuning.run", "hymenoptera", "--smoke-test", "--data-root", str(data_root), "--storage", storage)
    one_line_error(out, "tuning.run", "is not writable (cannot create a file in /proc")
    assert len(out.stderr.strip().splitlines()) == 1, out.stderr
    assert not Path(storage).exists()


def test_weights_of_another_network(cli, tmp_path, data_root):
    import torch
    import torchvision

    weights = tmp_path / "resnet18.pth"
    torch.save(torchvision.models.resnet18().state_dict(), weights)
    out = cli("tuning.run", "hymenoptera", "--weights", str(weights), "--data-root", str(data_root),
                  "--storage", str(tmp_path / "runs"))
    one_line_error(out, "tuning.run", "does not match this backbone")
    assert not (tmp_path / "runs").exists()


def test_only_unreadable_images_in_a_class(cli, tmp_path):
    root = tmp_path / "root"
    make_image_folder(root / "hymenoptera_data", {"train": 2, "val": 2})
    for f in (root / "hymenoptera_data" / "val" / "bees").iterdir():
        f.write_bytes(b"\xff\xd8 truncated")
    out = cli("tuning.run", "hymenoptera", "--data-root", str(root), "--storage", str(tmp_path / "runs"))
    one_line_error(out, "tuning.run", "val/bees holds no readable image")
    assert not (tmp_path / "runs").exists()


def test_empty_data_root(cli, tmp_path):
    (tmp_path / "empty").mkdir()
    out = cli("tuning.run", "hymenoptera", "--data-root", str(tmp_path / "empty"), "--storage", str(tmp_path / "runs"))
    one_line_error(out, "tuning.run", "put the 'hymenoptera_data' folder under")
    assert list((tmp_path / "empty").iterdir()) == []


def test_predict_on_a_file_that_is_not_an_image(cli, finished_export, tmp_path):
    text = tmp_path / "notes.jpg"
    text.write_text("hello")
    out = cli("tuning.predict", str(finished_export), str(text))
    one_line_error(out, "tuning.predict", "is not a readable image")


@pytest.mark.parametrize("breakage, message", [
    ("empty_class", "val/bees holds no images"),
    ("one_class", "a classifier needs at least two"),
])
def test_broken_dataset_folders(cli, tmp_path, breakage, message):
    root = tmp_path / "root"
    make_image_folder(root / "hymenoptera_data", {"train": 2, "val": 2})
    base = root / "hymenoptera_data"
    victims = [base / "val" / "bees"] if breakage == "empty_class" else [base / s / "bees" for s in ("train", "val")]
    for folder in victims:
        for f in folder.iterdir():
            f.unlink()
        if breakage == "one_class":
            folder.rmdir()
    out = cli("tuning.run", "hymenoptera", "--data-root", str(root), "--storage", str(tmp_path / "runs"))
    one_line_error(out, "tuning.run", message)
    assert not (tmp_path / "runs").exists()
