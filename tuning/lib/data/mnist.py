"""MNIST's files: where torchvision puts them, fetching them through torchvision, and its idx
format (`*-idx3-ubyte` images, `*-idx1-ubyte` labels, plain or gzipped), parsed with numpy and
cached: 70,000 items are read through one array per file, not one open per image."""
from __future__ import annotations

import contextlib
import functools
import gzip
import io
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from tuning.lib.errors import UsageError

IMAGES_MAGIC, LABELS_MAGIC = 2051, 2049  # 0x0803: ubyte, 3 dims; 0x0801: ubyte, 1 dim


@functools.lru_cache(maxsize=4)
def read_idx(path: str) -> np.ndarray:
    """The array in an idx file (uint8 only, as MNIST's); ValueError if it is not one."""
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08 or raw[3] not in (1, 3):
        raise ValueError(f"{path} is not a uint8 idx file (magic {raw[:4].hex()})")
    ndim = raw[3]
    shape = tuple(int.from_bytes(raw[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(shape)):
        raise ValueError(f"{path} holds {data.size} bytes for a {shape} array")
    array = data.reshape(shape)
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
