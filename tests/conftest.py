"""Shared fixtures: one local Ray per test session, and tiny generated ImageFolder datasets."""
from __future__ import annotations

import atexit
import importlib
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from experiments import EXPERIMENTS, Experiment
from tuning.lib import allocator
from tuning.lib.data.fetch import DATA_ROOT_ENV
from tuning.lib.data.sources import DATASETS, FolderSource
from tuning.lib.files import CACHE_ENV

TINY = "tiny"
# Decoded stores and feature caches of this test session go to a fresh dir, not ~/.cache; set
# before Ray starts so its workers inherit it, and removed when the session ends (each run
# otherwise left ~40 MB behind in /tmp).
os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="tuning-cache-")
atexit.register(shutil.rmtree, os.environ[CACHE_ENV], ignore_errors=True)


@pytest.fixture(scope="session")
def ray_session():
    # Ray 2.60 has no local_mode: a real single-node Ray, started once; its reused workers wait for
    # a stopped trial's thread and train with jemalloc, as the product's Ray does
    # (tuning.app.search.start_ray). "local": never a cluster another test records (test_cluster)
    os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")
    with allocator.preloaded_children():
        ray.init(address="local", num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def s3():
    """A real S3 API server (moto) on a free port of 127.0.0.1, one per session: moto's accounts
    and its IAM switch live in this process (tests/s3.py)."""
    from tests import s3 as moto_s3

    server, bucket = moto_s3.start()
    yield bucket
    server.stop()


@dataclass
class Ran:
    returncode: int
    stdout: str
    stderr: str


@pytest.fixture
def cli(ray_session, capsys):
    """A command's `main(argv)` run in this process: the exit code and the console a user gets,
    without the ~9 s a fresh Python spends importing torch, timm and Ray. An uncaught exception
    (a traceback for the user) fails the test by itself. A few tests keep a real subprocess to
    check the process boundary. Needs the session's Ray: a check that asks Ray must not start
    another one here."""
    def call(module: str, *args: str, **kwargs) -> Ran:
        main = importlib.import_module(module).main
        capsys.readouterr()
        try:
            main(list(args), **kwargs)
            code = 0
        except SystemExit as stop:
            code = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        out = capsys.readouterr()
        return Ran(code, out.out, out.err)

    return call


def write_image(path: Path, label: int, rng: np.random.Generator, size=(40, 48), mode="RGB") -> None:
    """Class 0 leans red, class 1 blue, under heavy noise: learnable, but not in one step."""
    base = np.array([150, 100, 110]) if label == 0 else np.array([110, 100, 150])
    pixels = np.clip(base + rng.normal(0, 60, (size[0], size[1], 3)), 0, 255).astype(np.uint8)
    img = Image.fromarray(pixels)
    if mode == "RGBA":
        img = img.convert("RGBA")
    elif mode == "P":
        img = img.convert("P")
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)


def make_image_folder(
    root: Path, counts: dict[str, int], classes=("ants", "bees"), seed: int = 0
) -> Path:
    """`root/<split>/<class>/*`, with the oddities of real folders: a GIF, a PNG with alpha, and a
    file name with a space."""
    rng = np.random.default_rng(seed)
    for split, n in counts.items():
        for label, cls in enumerate(classes):
            for i in range(n):
                suffix, mode = {0: (".gif", "P"), 1: (".png", "RGBA"), 2: (" copy.jpg", "RGB")}.get(i, (".jpg", "RGB"))
                write_image(root / split / cls / f"img{i}{suffix}", label, rng, mode=mode)
    return root


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory) -> Path:
    """A data root holding the `tiny` dataset: 2 classes, 12 train and 8 val images per class."""
    root = tmp_path_factory.mktemp("data")
    make_image_folder(root / "tiny", {"train": 12, "val": 8})
    return root


@pytest.fixture(scope="session")
def tiny_experiment() -> Experiment:
    """An experiment small enough for a test: 32 px inputs, ASHA halving every epoch."""
    if TINY not in DATASETS:
        DATASETS.add(TINY, FolderSource("tiny"))
    if TINY not in EXPERIMENTS:
        EXPERIMENTS.add(TINY, Experiment(name=TINY, dataset=TINY, image_size=32, epochs=3,
                                         samples=6, reduction_factor=2, grace_period=0.05))
    return EXPERIMENTS.get(TINY)


def hymenoptera_root() -> Path | None:
    root = os.environ.get(DATA_ROOT_ENV)
    if root and (Path(root) / "hymenoptera_data").is_dir():
        return Path(root)
    return None


@pytest.fixture(scope="session")
def finished_run(ray_session, tiny_root, tiny_experiment, tmp_path_factory) -> Path:
    """One real search of the tiny experiment, shared by the tests that inspect its outputs."""
    from tuning.run import main

    storage = tmp_path_factory.mktemp("runs")
    main(["tiny", "--data-root", str(tiny_root), "--storage", str(storage), "--seed", "3"])
    return storage / "tiny"


def trial_dirs(run_dir: Path) -> list[Path]:
    return sorted(p for p in run_dir.glob("trial_*") if p.is_dir())


@pytest.fixture(scope="session")
def finished_export(finished_run) -> Path:
    return finished_run / "best"


def make_flat_folder(root: Path, counts: dict[str, int], seed: int = 0) -> Path:
    """`root/<class>/*` as the Pokemon set has it: jpg, jpeg and png mixed, PNGs with alpha or a
    palette among them."""
    rng = np.random.default_rng(seed)
    kinds = [(".jpg", "RGB"), (".jpeg", "RGB"), (".png", "RGBA"), (".png", "P"), (".png", "RGB")]
    for label, (cls, n) in enumerate(counts.items()):
        for i in range(n):
            suffix, mode = kinds[i % len(kinds)]
            write_image(root / cls / f"{cls}{i:03d}{suffix}", label % 2, rng, mode=mode)
    return root


def write_idx(path: Path, array: np.ndarray) -> None:
    """A real idx file (magic 2051 for uint8 images, 2049 for labels, big-endian sizes), gzipped
    when the name ends in .gz."""
    import gzip

    magic = {3: 2051, 1: 2049}[array.ndim]
    payload = magic.to_bytes(4, "big") + b"".join(d.to_bytes(4, "big") for d in array.shape)
    payload += np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(payload) if path.suffix == ".gz" else payload)


def make_mnist(root: Path, n_train: int = 200, n_test: int = 60, gz: bool = True, seed: int = 0) -> Path:
    """torchvision's `root/MNIST/raw/` with 28x28 digits: each class a bright bar at its own place,
    under noise (learnable, not trivial). Images gzipped when `gz`, labels the other way round,
    so one dataset exercises both."""
    rng = np.random.default_rng(seed)
    raw = root / "MNIST" / "raw"
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        labels = np.arange(n) % 10
        rng.shuffle(labels)
        images = rng.integers(0, 60, (n, 28, 28)).astype(np.uint8)
        for i, d in enumerate(labels):
            images[i, 4 + 2 * d : 6 + 2 * d, 4:24] = 255
        write_idx(raw / f"{prefix}-images-idx3-ubyte{'.gz' if gz else ''}", images)
        write_idx(raw / f"{prefix}-labels-idx1-ubyte{'' if gz else '.gz'}", labels.astype(np.uint8))
    return root


# A user's folder broken in each way we name; the message names the folder ({base}).
BROKEN_FOLDERS = [
    ("missing", "folder {base} not found"),
    ("one_class", "{base} has 1 class; a classifier needs at least two"),
    ("too_few", "class folder {base}/b has 2 image(s); splitting into train/val/test needs at least 3"),
    ("unreadable", "class folder {base}/b holds no readable image"),
    ("classes_differ", "{base}/val has classes ['a', 'c'], but train has ['a', 'b']"),
]


def make_broken_folder(base: Path, breakage: str) -> Path:
    if breakage == "classes_differ":
        make_image_folder(base, {"train": 3, "val": 3}, classes=("a", "b"))
        (base / "val" / "b").rename(base / "val" / "c")
    elif breakage != "missing":
        make_flat_folder(base, {"a": 5} if breakage == "one_class" else {"a": 5, "b": 2 if breakage == "too_few" else 5})
        for f in (base / "b").glob("*") if breakage == "unreadable" else ():
            f.write_bytes(b"garbage")
    return base
