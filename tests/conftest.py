"""Shared fixtures: one local Ray per test session, and tiny generated ImageFolder datasets."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
import ray
from PIL import Image

from experiments import EXPERIMENTS, Experiment
from tuning.datasets import DATASETS, DATA_ROOT_ENV, FolderSource
from tuning.store import CACHE_ENV

TINY = "tiny"
# Decoded stores and feature caches of this test session go to a fresh dir, not ~/.cache; set
# before Ray starts so its workers inherit it.
os.environ[CACHE_ENV] = tempfile.mkdtemp(prefix="tuning-cache-")


@pytest.fixture(scope="session")
def ray_session():
    # Ray 2.60 has no local_mode: a real single-node Ray, started once.
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
    yield
    ray.shutdown()


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
                                         samples=6, reduction_factor=2))
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
