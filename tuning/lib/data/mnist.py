"""MNIST's files: where torchvision puts them, fetching them through torchvision, and its idx
format (`*-idx3-ubyte` images, `*-idx1-ubyte` labels, plain or gzipped), read by torchvision and
cached: 70,000 items are read through one array per file, not one open per image."""
from __future__ import annotations

import contextlib
import functools
import gzip
import io
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tuning.lib.errors import UsageError


@functools.lru_cache(maxsize=4)
def read_idx(path: str) -> np.ndarray:
    """The array in an idx file, through torchvision's reader (the one its read_image_file and
    read_label_file wrap, which takes any shape: the caller tells images from labels); ValueError
    if it is not one."""
    import torch
    from torchvision.datasets.mnist import read_sn3_pascalvincent_tensor

    try:
        if not path.endswith(".gz"):
            tensor = read_sn3_pascalvincent_tensor(path)
        else:  # torchvision opens a plain file only: its download unpacks the .gz files it fetched
            with tempfile.NamedTemporaryFile(suffix=".idx") as plain:
                with gzip.open(path, "rb") as packed:
                    shutil.copyfileobj(packed, plain)
                plain.flush()
                tensor = read_sn3_pascalvincent_tensor(plain.name)
    except (AssertionError, KeyError, RuntimeError):  # its checks of the magic and the size are asserts
        tensor = None
    if tensor is None or tensor.dtype != torch.uint8:
        raise ValueError(f"{path} is not a whole uint8 idx file, as MNIST's are")
    array = tensor.numpy()
    array.flags.writeable = False
    return array


@dataclass(frozen=True)
class IdxReader:
    """Opens "train:123" / "test:45" as a PIL image from the cached idx arrays."""

    images: tuple[tuple[str, str], ...]  # (split, idx file)

    def __call__(self, ref: str) -> Image.Image:
        split, _, index = ref.partition(":")
        return Image.fromarray(read_idx(dict(self.images)[split])[int(index)])


FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
         "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}


def find(raw: Path) -> dict[str, tuple[Path, Path]] | None:
    """Each split's (images, labels) file, plain or gzipped; None if one is missing."""
    found = {}
    for split, names in FILES.items():
        paths = [next((p for p in (raw / n, raw / f"{n}.gz") if p.is_file()), None) for n in names]
        if paths[0] is None or paths[1] is None:
            return None
        found[split] = (paths[0], paths[1])
    return found


def locate(base: Path) -> dict[str, tuple[Path, Path]]:
    """The idx files under `base/raw` (torchvision's `MNIST` folder), downloaded through
    torchvision when absent; offline, one UsageError and nothing left behind."""
    raw = base / "raw"
    found = find(raw)
    if found is not None:
        return found
    import torchvision

    created = not base.exists()
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # its per-mirror chatter
            torchvision.datasets.MNIST(str(base.parent), download=True)
    except Exception as err:  # URLError, RuntimeError("Error downloading ..."), bad checksums
        if created:
            shutil.rmtree(base, ignore_errors=True)
        reason = str(err).splitlines()[0] if str(err) else type(err).__name__
        raise UsageError(
            f"{raw} holds no MNIST idx files and downloading them through torchvision failed ({reason}); "
            f"put {', '.join(n for names in FILES.values() for n in names)} (or .gz) there"
        ) from None
    found = find(raw)
    if found is None:
        raise UsageError(f"torchvision's download left no MNIST idx files in {raw}")
    return found
