"""Where a run dir lives: a local folder, or any URI pyarrow's filesystems take (s3://, gs://,
file://, a shared mount), as Ray Tune needs for several nodes.

Ray writes the trials there itself. Our own files (run.json, the export, results.parquet, the
report's plots) are written to a local folder first: the run dir itself when it is local, else a
mirror under the user's cache, uploaded with `push` and fetched with `pull`."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from tuning.lib.errors import UsageError
from tuning.lib.files import cache_root


def is_uri(location: str) -> bool:
    return "://" in location


@dataclass(frozen=True)
class RunLocation:
    storage: str  # a local path or a URI
    name: str

    @property
    def remote(self) -> bool:
        return is_uri(self.storage)

    @property
    def uri(self) -> str:
        """What Ray gets as storage_path/name, and what the user is shown."""
        if self.remote:
            return f"{self.storage.rstrip('/')}/{self.name}"
        return str(Path(self.storage).expanduser().resolve() / self.name)

    @property
    def ray_storage(self) -> str:
        return self.storage.rstrip("/") if self.remote else str(Path(self.storage).expanduser().resolve())

    @property
    def local(self) -> Path:
        """The local folder holding our own files."""
        if not self.remote:
            return Path(self.uri)
        parsed = urlparse(self.uri)
        cache = cache_root() / "runs"
        return cache / parsed.scheme / (parsed.netloc or "_") / parsed.path.strip("/")

    def filesystem(self) -> tuple[pafs.FileSystem, str]:
        try:
            return pafs.FileSystem.from_uri(self.uri)
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for bad URIs
            raise UsageError(f"--storage {self.storage}: {str(err).splitlines()[0]}") from None

    def exists(self) -> bool:
        if not self.remote:
            return self.local.exists()
        fs, path = self.filesystem()
        return fs.get_file_info(path).type != pafs.FileType.NotFound

    def push(self, *names: str) -> None:
        """Upload our files (or folders) from the local mirror; nothing to do for a local run dir."""
        if not self.remote:
            return
        fs, path = self.filesystem()
        fs.create_dir(path, recursive=True)  # object stores ignore it; local and NFS need it
        for name in names:
            source = (self.local / name).resolve()
            if source.is_dir():
                fs.create_dir(f"{path}/{name}", recursive=True)
                pafs.copy_files(str(source), f"{path}/{name}", source_filesystem=pafs.LocalFileSystem(),
                                destination_filesystem=fs)
            elif source.is_file():
                with fs.open_output_stream(f"{path}/{name}") as out:
                    out.write(source.read_bytes())

    def pull(self, *names: str) -> None:
        if not self.remote:
            return
        fs, path = self.filesystem()
        self.local.mkdir(parents=True, exist_ok=True)
        for name in names:
            info = fs.get_file_info(f"{path}/{name}")
            if info.type == pafs.FileType.Directory:
                (self.local / name).mkdir(parents=True, exist_ok=True)
                pafs.copy_files(f"{path}/{name}", str(self.local / name), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
            elif info.type == pafs.FileType.File:
                with fs.open_input_stream(f"{path}/{name}") as src:
                    (self.local / name).write_bytes(src.read())
