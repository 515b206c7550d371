"""Where a run dir lives: a local folder, or any URI pyarrow's filesystems take (s3://, gs://,
file://, a shared mount), as Ray Tune needs for several nodes.

Ray writes the trials there itself. Our own files (run.json, the export, results.parquet, the
report's plots) are written to a local folder first: the run dir itself when it is local, else a
mirror under the user's cache, uploaded with `push` and fetched with `pull`.

A URI may carry the filesystem's options as a query (`s3://bucket/runs?endpoint_override=HOST:PORT&
scheme=http&region=R`, as pyarrow's `FileSystem.from_uri` takes them): paths inside the run dir go
before the query, never after it. Credentials come from the usual environment (AWS_ACCESS_KEY_ID,
~/.aws, an instance role), as Ray's workers find them too."""
from __future__ import annotations

import os
import re
import uuid
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import pyarrow.fs as pafs

from tuning.lib.errors import UsageError
from tuning.lib.files import cache_root


def is_uri(location: str) -> bool:
    return "://" in location


def split_query(uri: str) -> tuple[str, str]:
    """`s3://b/runs?region=r` -> (`s3://b/runs`, `?region=r`); the query's values may hold `/`."""
    base, mark, query = uri.partition("?")
    return base, mark + query


def join(uri: str, *names: str) -> str:
    """A path inside `uri`, its query kept at the end."""
    base, query = split_query(uri)
    return "/".join([base.rstrip("/"), *(n.strip("/") for n in names)]) + query


def check_name(name: str) -> None:
    """A run dir's name is one folder under --storage: a `/` or `..` would put the run, and the
    next run's `exists` check, somewhere else; a `?` would end a URI's path."""
    if name in ("", ".", "..") or any(c in name for c in "/\\?\0"):
        raise UsageError(f"--name {name!r} must be one folder name under --storage (no '/', '\\', '?', "
                         "and not '.' or '..')")


def parse_run_dir(run_dir: str) -> "RunLocation":
    """A run dir as the user names it (`runs/NAME`, `s3://bucket/runs/NAME?region=r`)."""
    if is_uri(run_dir):
        base, query = split_query(run_dir)
        storage, _, name = base.rstrip("/").rpartition("/")
        return RunLocation(storage + query, name)
    path = Path(run_dir).expanduser().resolve()
    return RunLocation(str(path.parent), path.name)


def fetch_export(export_dir: "str | Path") -> Path:
    """An export named by a URI (`s3://bucket/runs/NAME/best?region=r`) copied, with its run's
    run.json, into the local mirror of its run dir; a local path as it is."""
    if not is_uri(str(export_dir)):
        return Path(export_dir)
    export = parse_run_dir(str(export_dir))
    run = parse_run_dir(export.storage)
    SPEC = "run.json"  # tuning.app.rundir.SPEC_FILE, which imports this module
    run.pull(SPEC, export.name)
    if not (run.local / export.name).is_dir():
        raise UsageError(f"{export.uri} holds no export")
    return run.local / export.name


# A probe of remote storage asks once and waits briefly: a wrong endpoint or a missing bucket is
# the user's to fix, not something to retry for a minute (the AWS SDK's default).
PROBE_CONNECT_S = 3.0
PROBE_REQUEST_S = 8.0


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
            return join(self.storage, self.name)
        return str(Path(self.storage).expanduser().resolve() / self.name)

    def file_uri(self, name: str) -> str:
        """A file in the run dir, as a path or a URI pyarrow (and pandas) open."""
        return join(self.uri, name) if self.remote else str(Path(self.uri) / name)

    @property
    def ray_storage(self) -> str:
        if self.remote:
            base, query = split_query(self.storage)
            return base.rstrip("/") + query
        return str(Path(self.storage).expanduser().resolve())

    @property
    def local(self) -> Path:
        """The local folder holding our own files."""
        if not self.remote:
            return Path(self.uri)
        parsed = urlparse(split_query(self.uri)[0])
        cache = cache_root() / "runs"
        host = parsed.netloc.rpartition("@")[2]  # never credentials in a folder name
        return cache / parsed.scheme / (host or "_") / parsed.path.strip("/")

    def filesystem(self, probing: bool = False) -> tuple[pafs.FileSystem, str]:
        """The run dir's filesystem and path in it. `probing`: an S3 filesystem that tries once
        and gives up after seconds, for the checks before a search."""
        try:
            fs, path = pafs.FileSystem.from_uri(self.uri)
        except Exception as err:  # pyarrow raises ArrowInvalid, OSError, ... for bad URIs
            raise UsageError(f"--storage {self.storage}: {first_line(err)}") from None
        if probing and isinstance(fs, pafs.S3FileSystem):
            options = fs.__reduce__()[1][0]
            if not options.get("proxy_options", {}).get("host"):
                options.pop("proxy_options", None)
            options.update(connect_timeout=PROBE_CONNECT_S, request_timeout=PROBE_REQUEST_S)
            fs = pafs.S3FileSystem(**options, retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=1))
        return fs, path

    def exists(self) -> bool:
        if not self.remote:
            return self.local.exists()
        fs, path = self.filesystem(probing=True)
        try:
            return fs.get_file_info(path).type != pafs.FileType.NotFound
        except OSError as err:
            raise UsageError(f"--storage {self.storage}: cannot read {self.uri} ({storage_error(err)})") from None

    def check_writable(self) -> None:
        """Remote storage: write a new object beside the run dir and remove it, failing in one
        line if the endpoint, the bucket or the credentials refuse. Nothing there is overwritten:
        the probe's name is new."""
        fs, path = self.filesystem(probing=True)
        parent = path.rstrip("/").rpartition("/")[0] or path
        probe = f"{parent}/.tuning-probe-{uuid.uuid4().hex}"  # as the local check names its file
        try:
            with fs.open_output_stream(probe) as out:
                out.write(b"tuning storage probe\n")
        except OSError as err:
            raise UsageError(f"--storage {self.storage} is not writable ({storage_error(err)})") from None
        try:
            fs.delete_file(probe)
        except OSError:
            pass  # a bucket that takes writes but not deletes: the probe stays, nothing else changed

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
        """Fetch our files (or folders) into the local mirror; a storage error is one line."""
        if not self.remote:
            return
        try:
            self._pull(names)
        except OSError as err:
            raise UsageError(f"cannot read from {self.uri} ({storage_error(err)})") from None

    def _pull(self, names: tuple[str, ...]) -> None:
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


def first_line(err: BaseException) -> str:
    """pyarrow's S3 errors are one long line ending in a request id the user has no use for."""
    text = (str(err).strip().splitlines() or [type(err).__name__])[0]
    return text.split(" (Request ID:")[0]


# The AWS SDK's error codes (as pyarrow words them) that a user fixes in a known place
S3_ERRORS = {
    "NO_SUCH_BUCKET": "the bucket does not exist",
    "ACCESS_DENIED": "access denied: the credentials found may not write there",
    "NETWORK_CONNECTION": "cannot reach the endpoint",
    "INVALID_ACCESS_KEY_ID": "the access key is not known there",
    "SIGNATURE_DOES_NOT_MATCH": "the secret key does not match the access key",
}
CREDENTIAL_SOURCES = ("AWS_ACCESS_KEY_ID", "AWS_PROFILE", "AWS_WEB_IDENTITY_TOKEN_FILE",
                      "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "AWS_CONTAINER_CREDENTIALS_FULL_URI")


def storage_error(err: OSError) -> str:
    """One line for a storage error: what it means where the AWS SDK says so, else its first line;
    and, when nothing in the environment or ~/.aws gives credentials, that too (the SDK then sends
    the request unsigned, which a bucket refuses in its own words)."""
    text = first_line(err)
    code = re.search(r"AWS Error ([A-Z_]+)", text)
    said = S3_ERRORS.get(code.group(1)) if code else None
    if said and code:
        host = re.search(r"Failed to connect to (\S+)", text)
        text = f"{said}{' ' + host.group(1).rstrip(':') if host and code.group(1) == 'NETWORK_CONNECTION' else ''} (AWS Error {code.group(1)})"
    if code and not has_aws_credentials() and code.group(1) != "NETWORK_CONNECTION" and code.group(1) != "NO_SUCH_BUCKET":
        text = f"no AWS credentials: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or AWS_PROFILE; {text}"
    return text


def has_aws_credentials() -> bool:
    """Whether the usual places name any (an instance role cannot be seen from here)."""
    if any(os.environ.get(name) for name in CREDENTIAL_SOURCES):
        return True
    shared = os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.expanduser("~/.aws/credentials")
    return os.path.isfile(shared) or os.path.isfile(os.environ.get("AWS_CONFIG_FILE") or os.path.expanduser("~/.aws/config"))
