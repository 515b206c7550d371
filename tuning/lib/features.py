"""The frozen-prefix feature cache: the output of the first k (frozen) stages, computed once per
machine and shared by every trial with freeze depth k.

Frozen stages have fixed pretrained weights and BatchNorm in eval mode, so their output for an
image depends only on the input view; views are fixed per (seed, view, image)
(`tuning.lib.data.transforms.TrainViews`; epochs cycle through `Experiment.train_views` views), so
every trial at depth k needs the very same arrays: validation features once, training features
once per view. Each entry is a `.npy` file, memory-mapped by the
trials that read it. A per-entry file lock makes two trials that need an entry at the same time
compute it once; a deeper entry starts from the deepest shallower one already cached. The cache
never holds more than `limit_bytes` on disk: least recently used entries are evicted, and an entry
larger than the whole limit is not cached (its trial computes the prefix as it goes).

Every entry is sealed after it is written (`tuning.lib.files.seal`) and its whole seal is checked
on every read: an entry whose bytes changed, or whose writer died before sealing it, is reported in
one line and computed again, so no trial trains on garbage. The check hashes from the page cache
the trial is about to read anyway, a small fraction of computing the entry.
"""
from __future__ import annotations

import contextlib
import hashlib
import itertools
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from filelock import FileLock

from tuning.lib.errors import warn
from tuning.lib.files import atomic_path, cache_root, damage, seal, unseal

FORMAT = "tuning-features-1"
ENTRY = re.compile(r"d(\d+)-(.+)\.npy$")

# A batch of the prefix's inputs for the given image indices (normalised float NCHW, on the device).
Inputs = Callable[[range], torch.Tensor]


def namespace(**identity: object) -> str:
    """Everything the frozen features depend on: data, decode size, views, backbone, weights."""
    text = json.dumps({"format": FORMAT, **identity}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


@dataclass(frozen=True)
class FeatureCache:
    namespace: str
    limit_bytes: int
    root: str | None = None  # default: this machine's cache_root()/features, resolved in the trial

    @property
    def base(self) -> Path:
        return Path(self.root) if self.root else cache_root() / "features"

    def entry(self, depth: int, view: str) -> Path:
        return self.base / self.namespace / f"d{depth}-{view}.npy"

    def get(
        self, model: torch.nn.Module, depth: int, view: str, count: int, inputs: Inputs, batch_size: int = 16,
        also: tuple[int, ...] = (),
    ) -> np.ndarray | None:
        """The depth-`depth` features of `count` images (memory-mapped, read-only), or None when
        they cannot fit under the limit. Computing them passes through every shallower depth: those
        in `also` that are not cached yet are written on the way, where they fit without evicting
        anything, so that a trial at such a depth later finds them (the search tries deep, cheap
        depths first, tuning.app.sampler)."""
        path = self.entry(depth, view)
        path.parent.mkdir(parents=True, exist_ok=True)
        with FileLock(str(path) + ".lock"):
            if path.exists():
                why = damage(path)
                if why is None:
                    os.utime(path)  # recently used
                    return np.load(path, mmap_mode="r")
                warn(f"feature cache entry {path} is damaged ({why}); computing it again")
                unseal(path)
            start, source = self.deepest_below(depth, view)
            keep = tuple(d for d in also if start < d < depth and not self.entry(d, view).is_file())
            batches = prefix_batches(model, start, source, count, inputs, batch_size, keep)
            first, first_kept = next(batches)
            shape = (count, *first.shape[1:])
            if not self.reserve(int(np.prod(shape)) * 4):
                return None
            extra, pending = {}, int(np.prod(shape)) * 4  # the entry asked for is not on disk yet
            for d, a in first_kept.items():
                size = int(np.prod((count, *a.shape[1:]))) * 4
                if self.reserve(pending + size, evict=False):
                    extra[d], pending = (count, *a.shape[1:]), pending + size
            with contextlib.ExitStack() as stack:
                outs = {None: (path, shape), **{d: (self.entry(d, view), s) for d, s in extra.items()}}
                maps = {k: np.lib.format.open_memmap(stack.enter_context(atomic_path(p)), mode="w+",
                                                     dtype=np.float32, shape=s) for k, (p, s) in outs.items()}
                done = 0
                for block, kept in itertools.chain([(first, first_kept)], batches):
                    maps[None][done : done + len(block)] = block
                    for d in extra:
                        maps[d][done : done + len(block)] = kept[d]
                    done += len(block)
                for out in maps.values():
                    out.flush()
                maps.clear()
            for p in (path, *(self.entry(d, view) for d in extra)):
                seal(p)
            return np.load(path, mmap_mode="r")

    def check(self) -> list[Path]:
        """Before any trial: verify every entry of this namespace and remove the damaged ones,
        saying so here, in the driver, where the user sees it (a trial's stderr goes to its log)."""
        removed = []
        for path in sorted((self.base / self.namespace).glob("*.npy")):
            with FileLock(str(path) + ".lock"):
                why = damage(path) if path.exists() else None
                if why is not None:
                    warn(f"feature cache entry {path} is damaged ({why}); computing it again")
                    unseal(path)
                    removed.append(path)
        return removed

    def deepest_below(self, depth: int, view: str) -> tuple[int, np.ndarray | None]:
        """A cached shallower prefix of the same view to start from: stage outputs compose."""
        for d in range(depth - 1, 0, -1):
            path = self.entry(d, view)
            if path.is_file() and damage(path) is None:  # a damaged one is redone when its depth is asked for
                try:
                    return d, np.load(path, mmap_mode="r")
                except (OSError, ValueError):  # evicted meanwhile
                    continue
        return 0, None

    def reserve(self, size: int, evict: bool = True) -> bool:
        """Make room for `size` bytes, evicting least recently used entries; False if it can never
        fit (or, with `evict=False`, if it does not fit now)."""
        if size > self.limit_bytes:
            return False
        self.base.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.base / "budget.lock")):
            files = sorted(self._files(), key=lambda f: f[1])
            used = sum(s for _, _, s in files)
            if not evict:
                return used + size <= self.limit_bytes
            for path, _, s in files:
                if used + size <= self.limit_bytes:
                    break
                if path.suffix == ".npy":  # a .tmp is being written by a live trial
                    unseal(path)  # readers keep their mapping until they close it
                    used -= s
        return True

    def _files(self) -> Iterator[tuple[Path, float, int]]:
        for path in self.base.glob("*/*"):
            if path.suffix in (".npy", ".tmp"):
                try:
                    st = path.stat()
                except FileNotFoundError:
                    continue
                yield path, st.st_mtime, st.st_size

    def used_bytes(self) -> int:
        return sum(s for _, _, s in self._files())


def prefix_batches(
    model: torch.nn.Module, start: int, source: np.ndarray | None, count: int, inputs: Inputs, batch_size: int,
    keep: tuple[int, ...] = (),
) -> Iterator[tuple[np.ndarray, dict[int, np.ndarray]]]:
    """The frozen prefix's output, batch by batch, from the inputs or from a shallower entry, and
    the outputs at the depths in `keep` on the way."""
    device = next(model.parameters()).device
    for i in range(0, count, batch_size):
        idx = range(i, min(count, i + batch_size))
        x = torch.from_numpy(np.array(source[i : idx.stop])).to(device) if source is not None else inputs(idx)
        out, kept = model.frozen_features_keeping(x, start=start, keep=keep)
        yield out.float().cpu().numpy(), {d: t.float().cpu().numpy() for d, t in kept.items()}
