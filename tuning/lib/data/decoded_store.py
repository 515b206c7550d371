"""Decode once: every image of a dataset, decoded and resized, in one memory-mapped Arrow file.

The file is keyed by a hash of the listed files' bytes, the split assignment and the decode size,
and lives in a per-machine cache (`tuning.lib.files.cache_root`). Every trial and
every later run maps it read-only instead of decoding JPEGs again; pages are shared between the
processes of a machine through the OS page cache, so N trials cost one copy of the pixels.

The file is sealed when written (`tuning.lib.files.seal`: size, header, checksum). The driver
checks the whole seal once per run before any trial starts; a damaged file (a full disk, a copy cut
short) is reported in one line and decoded again. Trials check size and header only, once per
process: the driver's full check ran moments before.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import pyarrow as pa
from filelock import FileLock

from tuning.lib.errors import warn
from tuning.lib.data.decode import Dataset, Split, decode_listing
from tuning.lib.data.listing import Listing
from tuning.lib.files import cache_root, damage, file_digest, seal, unseal, write_atomic

FORMAT = "tuning-store-2"  # bump when the decoding or the layout changes (2: 16-bit grayscale scaled, EXIF orientation applied)


def store_key(listing: Listing, resize: int, mode: str) -> str:
    """Content, not paths: a moved folder still hits; an edited image misses."""
    digests = {str(p): file_digest(p) for p in listing.content}
    h = hashlib.sha256(f"{FORMAT} resize={resize} mode={mode}\n".encode())
    h.update(json.dumps(listing.classes).encode())
    h.update(json.dumps(sorted(digests.values())).encode())
    for split, items in sorted(listing.splits.items()):
        for item in items:
            h.update(f"{split}\t{item.label}\t{digests.get(item.ref, item.ref)}\n".encode())
    return h.hexdigest()[:32]


@dataclass(frozen=True)
class StoreHandle:
    """What a trial needs to open the store: its path on this machine, and (only on a multi-node
    cluster) the file's bytes in Ray's object store for nodes that lack it."""

    path: str
    key: str
    classes: tuple[str, ...]
    ref: object | None = None  # ray.ObjectRef of the file's bytes

    def open(self) -> Dataset:
        path = Path(self.path)
        own = cache_root() / "store" / f"{self.key}.arrow"
        # another node, with a cache root of its own, keeps its own copy, even where the driver's
        # path is visible too (a shared home; nodes on one machine, as in tests/test_cluster.py)
        if (self.ref is not None and own != path) or not path.is_file():
            path = own
        if self.ref is not None and (path != Path(self.path) or not path.is_file()):  # the driver checked its own
            fetch_copy(str(path), self.ref)
        return open_store(str(path))


@lru_cache(maxsize=4)  # checked in full once per process, as the driver checks its own copy once per run
def fetch_copy(path_str: str, ref: object) -> None:
    """This node's copy of the store, written from the object store unless a sound one is here."""
    import ray

    path = Path(path_str)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):
        if damage(path) is not None:
            write_atomic(path, memoryview(ray.get(ref)))
            seal(path)


def build(listing: Listing, resize: int, mode: str, root: Path | None = None) -> StoreHandle:
    """Open the store for this listing, decoding only if no run on this machine has done it."""
    key = store_key(listing, resize, mode)
    path = (root or cache_root()) / "store" / f"{key}.arrow"
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(path) + ".lock"):  # two runs starting together decode once
        why = damage(path) if path.exists() else "missing"
        if why not in (None, "missing"):
            warn(f"decoded store {path} is damaged ({why}); decoding the images again")
            unseal(path)
            open_store.cache_clear()  # this process may map the old file
        if why is None:
            skipped = json.loads(_schema(path).metadata.get(b"skipped", b"[]"))
            if skipped:
                warn(f"skipped {len(skipped)} unreadable image(s): {', '.join(skipped)}")
        else:
            _write(path, decode_listing(listing, resize, mode), listing)
            seal(path)
    return StoreHandle(str(path), key, tuple(listing.classes))


def _write(path: Path, data: Dataset, listing: Listing) -> None:
    kept = {ref for split in data.splits.values() for ref in split.paths}
    skipped = [item.ref for items in listing.splits.values() for item in items if item.ref not in kept]
    columns: dict[str, list] = {k: [] for k in ("split", "label", "height", "width", "channels", "path", "pixels")}
    for name, split in data.splits.items():
        for image, label, ref in zip(split.images, split.labels, split.paths):
            h, w, c = image.shape
            for k, v in (("split", name), ("label", int(label)), ("height", h), ("width", w),
                         ("channels", c), ("path", ref), ("pixels", np.ascontiguousarray(image).tobytes())):
                columns[k].append(v)
    schema = pa.schema(
        [("split", pa.string()), ("label", pa.int64()), ("height", pa.int32()), ("width", pa.int32()),
         ("channels", pa.int8()), ("path", pa.string()), ("pixels", pa.large_binary())],
        metadata={"format": FORMAT, "classes": json.dumps(data.classes), "skipped": json.dumps(skipped)},
    )
    table = pa.Table.from_pydict(columns, schema=schema)
    sink = pa.BufferOutputStream()
    with pa.ipc.new_file(sink, schema) as writer:
        writer.write_table(table)
    write_atomic(path, memoryview(sink.getvalue()))


def _schema(path: Path) -> pa.Schema:
    with pa.memory_map(str(path)) as source:
        return pa.ipc.open_file(source).schema


@lru_cache(maxsize=4)  # a reused Ray actor maps the file once, not once per trial
def open_store(path: str) -> Dataset:
    """Zero-copy: every image is a read-only numpy view into the memory-mapped file."""
    why = damage(Path(path), full=False)
    if why is not None:  # changed since the driver checked it: reading it could crash the process
        raise RuntimeError(f"decoded store {path} is damaged ({why}); the next run decodes it again")
    table = pa.ipc.open_file(pa.memory_map(path)).read_all().combine_chunks()
    classes = json.loads(table.schema.metadata[b"classes"])
    pixels = table.column("pixels").chunk(0)
    offsets = np.frombuffer(pixels.buffers()[1], dtype=np.int64)[pixels.offset :]
    data = np.frombuffer(pixels.buffers()[2], dtype=np.uint8)
    shapes = zip(table.column("height").to_numpy(), table.column("width").to_numpy(),
                 table.column("channels").to_numpy())
    images = [data[offsets[i] : offsets[i + 1]].reshape(h, w, c) for i, (h, w, c) in enumerate(shapes)]
    split_of = table.column("split").to_pylist()
    labels = table.column("label").to_numpy()
    paths = table.column("path").to_pylist()
    splits: dict[str, Split] = {}
    for name in dict.fromkeys(split_of):
        idx = [i for i, s in enumerate(split_of) if s == name]
        splits[name] = Split([images[i] for i in idx], labels[idx], [paths[i] for i in idx])
    return Dataset(classes, splits)


def share(handle: StoreHandle, multi_node: bool) -> StoreHandle:
    """On a multi-node cluster, put the file's bytes in the object store once so that a node
    without the file writes its own copy; on one machine the path is enough."""
    if not multi_node:
        return handle
    import ray

    return StoreHandle(handle.path, handle.key, handle.classes, ray.put(Path(handle.path).read_bytes()))
