"""Where robustune keeps its files: `tracking.output_dir` (else $ROBUSTUNE_OUTPUT_DIR, else `runs`).

It is a local folder (the default), a path that every node of a cluster mounts (NFS, a PVC), or an object-store
URI: `s3://bucket/prefix` (AWS S3 or any S3-compatible server) or `gs://bucket/prefix` (Google Cloud Storage).
Every file of a run, search and study (config, checkpoints, final.pt, state, evaluation state, leaderboard)
is read and written through a *location*: `location(text)` is a `pathlib.Path` for a local or shared path
and an `ObjectPath` for an object-store URI, an object with the part of pathlib's interface robustune uses.
Locations travel between processes and nodes as text (`str(location)`: the path, or the URI), so every
node turns them back into the same place and nothing is read from another node's disk.

Object stores take their endpoint and credentials from the usual environment variables, on every node:
- S3: AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or an instance profile, ~/.aws), AWS_REGION, and for an
  S3-compatible server (MinIO, Ceph, a test server) AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL;
- GCS: GOOGLE_APPLICATION_CREDENTIALS (or the VM's service account).
Ray Train and Tune get the same place as their storage (`ray_storage`: a path and a pyarrow filesystem).
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import io
import os
import secrets
import shutil
import tempfile
from pathlib import Path, PurePosixPath
from typing import Any, Iterator, Union
from urllib.parse import urlparse

from robustune.config import ConfigError

OUTPUT_DIR_ENV = "ROBUSTUNE_OUTPUT_DIR"
DEFAULT_OUTPUT_DIR = "runs"
OBJECT_STORE_SCHEMES = {"s3": "s3", "gs": "gs", "gcs": "gs"}
PROBE_PREFIX = ".robustune-storage-check-"


class StorageError(ConfigError):
    """The storage cannot be used (unreachable endpoint, missing bucket, rejected credentials, a local folder
    that other nodes do not see); the message names the URI and what to do."""


# ------------------------------------------------------------------------------------------ locations
class ObjectPath:
    """A key (or key prefix, a "folder") in an object store, with pathlib's methods robustune uses. An object
    store has no folders: `mkdir` does nothing and a folder exists once something is stored under it."""

    def __init__(self, uri: str):
        scheme, _, rest = uri.partition("://")
        if scheme.lower() not in OBJECT_STORE_SCHEMES:
            raise StorageError(f"{uri!r} is not an object-store URI (s3://bucket/prefix or gs://bucket/prefix)")
        parts = tuple(part for part in rest.split("/") if part not in ("", "."))
        if not parts:
            raise StorageError(f"{uri!r} names no bucket: write s3://BUCKET/prefix or gs://BUCKET/prefix")
        if ".." in parts:
            raise StorageError(f"{uri!r}: '..' is not allowed in an object-store location")
        self.scheme, self.parts = OBJECT_STORE_SCHEMES[scheme.lower()], parts

    # --------------------------------------------------------------------------- names
    @property
    def bucket(self) -> str:
        return self.parts[0]

    @property
    def fs_path(self) -> str:
        """The path inside the filesystem (bucket/key), as pyarrow and Ray's storage_path take it."""
        return "/".join(self.parts)

    @property
    def filesystem(self):
        return object_filesystem(self.scheme, self.bucket)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.fs_path}"

    def __repr__(self) -> str:
        return f"ObjectPath({str(self)!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ObjectPath) and str(self) == str(other)

    def __lt__(self, other: ObjectPath) -> bool:
        return str(self) < str(other)

    def __hash__(self) -> int:
        return hash(str(self))

    def __truediv__(self, name: str | os.PathLike) -> ObjectPath:
        return ObjectPath(f"{self}/{os.fspath(name)}")

    @property
    def name(self) -> str:
        return self.parts[-1]

    @property
    def stem(self) -> str:
        return PurePosixPath(self.name).stem

    @property
    def suffix(self) -> str:
        return PurePosixPath(self.name).suffix

    @property
    def parent(self) -> ObjectPath:
        return ObjectPath(f"{self.scheme}://{'/'.join(self.parts[:-1])}") if len(self.parts) > 1 else self

    @property
    def parents(self) -> list[ObjectPath]:
        found, here = [], self
        while here.parent != here:
            here = here.parent
            found.append(here)
        return found

    def with_name(self, name: str) -> ObjectPath:
        return self.parent / name

    def resolve(self) -> ObjectPath:
        return self

    absolute = expanduser = resolve

    # ----------------------------------------------------------------------- queries
    def _type(self):
        return self.filesystem.get_file_info(self.fs_path).type

    def exists(self) -> bool:
        import pyarrow.fs as pafs

        return self._type() != pafs.FileType.NotFound

    def is_file(self) -> bool:
        import pyarrow.fs as pafs

        return self._type() == pafs.FileType.File

    def is_dir(self) -> bool:
        import pyarrow.fs as pafs

        return self._type() == pafs.FileType.Directory

    def iterdir(self) -> Iterator[ObjectPath]:
        import pyarrow.fs as pafs

        infos = self.filesystem.get_file_info(pafs.FileSelector(self.fs_path, allow_not_found=True))
        return iter(sorted(self / PurePosixPath(info.path).name for info in infos))

    def glob(self, pattern: str) -> Iterator[ObjectPath]:
        """Children matching `pattern` (fnmatch per '/'-separated part; no '**')."""
        first, _, rest = pattern.partition("/")
        for child in self.iterdir():
            if fnmatch.fnmatchcase(child.name, first):
                if not rest:
                    yield child
                else:
                    yield from child.glob(rest)

    def rglob(self, pattern: str) -> Iterator[ObjectPath]:
        import pyarrow.fs as pafs

        infos = self.filesystem.get_file_info(pafs.FileSelector(self.fs_path, recursive=True, allow_not_found=True))
        for info in infos:
            if fnmatch.fnmatchcase(PurePosixPath(info.path).name, pattern):
                yield ObjectPath(f"{self.scheme}://{info.path}")

    # ------------------------------------------------------------------ reads, writes
    def read_bytes(self) -> bytes:
        with self.filesystem.open_input_stream(self.fs_path) as stream:
            return stream.read()

    def read_text(self, encoding: str = "utf-8") -> str:
        return self.read_bytes().decode(encoding)

    def write_bytes(self, data: bytes) -> int:
        # One PUT: readers see the old object or the new one, never a part (object stores have no rename).
        with self.filesystem.open_output_stream(self.fs_path) as stream:
            stream.write(data)
        return len(data)

    def write_text(self, text: str, encoding: str = "utf-8") -> int:
        return self.write_bytes(text.encode(encoding))

    def mkdir(self, parents: bool = False, exist_ok: bool = False) -> None:
        """Object stores have no folders: nothing to create."""

    def rmdir(self) -> None:
        """Object stores have no folders: nothing to remove."""

    def unlink(self, missing_ok: bool = False) -> None:
        try:
            self.filesystem.delete_file(self.fs_path)
        except FileNotFoundError:
            if not missing_ok:
                raise

    def rename(self, target: str | ObjectPath) -> ObjectPath:
        target = location(target)
        if not isinstance(target, ObjectPath) or target.scheme != self.scheme:
            raise StorageError(f"cannot move {self} to {target}: not in the same object store")
        self.filesystem.move(self.fs_path, target.fs_path)
        return target

    replace = rename


Location = Union[Path, ObjectPath]


def is_object_store(value: Any) -> bool:
    if isinstance(value, ObjectPath):
        return True
    if isinstance(value, (str, os.PathLike)) and not isinstance(value, Path):
        scheme = str(value).partition("://")[0].lower()
        return "://" in str(value) and scheme in OBJECT_STORE_SCHEMES
    return False


def location(value: str | os.PathLike | ObjectPath) -> Location:
    """A local or shared path as a pathlib.Path; an object-store URI (s3://, gs://) as an ObjectPath."""
    if isinstance(value, (Path, ObjectPath)):
        return value
    text = os.fspath(value) if isinstance(value, os.PathLike) else str(value)
    if text.startswith("file://"):
        return Path(urlparse(text).path)
    if "://" in text:
        if is_object_store(text):
            return ObjectPath(text)
        raise StorageError(f"storage {text!r}: unsupported scheme {text.partition('://')[0]!r}; use a local or "
                           "shared path, s3://bucket/prefix or gs://bucket/prefix")
    return Path(text)


def output_root(configured: str | None) -> Location:
    """Where runs, searches and studies go: tracking.output_dir, else $ROBUSTUNE_OUTPUT_DIR, else ./runs.
    A local path is made absolute (it travels to other processes)."""
    return location(configured or os.environ.get(OUTPUT_DIR_ENV) or DEFAULT_OUTPUT_DIR).resolve()


def write_atomic(path: Location, data: bytes) -> None:
    """Whole or not at all: a local file through a flushed temporary file and a rename, an object in one PUT."""
    if isinstance(path, ObjectPath):
        path.write_bytes(data)
        return
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_tree(path: Location) -> None:
    if isinstance(path, ObjectPath):
        with contextlib.suppress(FileNotFoundError):
            path.filesystem.delete_dir(path.fs_path)
    else:
        shutil.rmtree(path, ignore_errors=True)


def ray_storage(path: Location) -> dict[str, Any]:
    """Ray Train / Tune RunConfig arguments that put their storage at `path`."""
    if isinstance(path, ObjectPath):
        return {"storage_path": path.fs_path, "storage_filesystem": path.filesystem}
    return {"storage_path": str(path)}


@contextlib.contextmanager
def local_file(path: Location) -> Iterator[Path]:
    """A local file with `path`'s content (the file itself when it is local; a temporary copy otherwise),
    for libraries that only open local files (MLflow's log_artifact)."""
    if not isinstance(path, ObjectPath):
        yield Path(path)
        return
    with tempfile.TemporaryDirectory(prefix="robustune-") as folder:
        copy = Path(folder) / path.name
        copy.write_bytes(path.read_bytes())
        yield copy


@contextlib.contextmanager
def staging(folder: Location) -> Iterator[Path]:
    """A local folder to write files for `folder` into: `folder` itself when it is local; otherwise a
    temporary folder whose files are uploaded to `folder` when the block ends without an error."""
    if not isinstance(folder, ObjectPath):
        Path(folder).mkdir(parents=True, exist_ok=True)
        yield Path(folder)
        return
    with tempfile.TemporaryDirectory(prefix="robustune-") as local:
        yield Path(local)
        for file in sorted(Path(local).rglob("*")):
            if file.is_file():
                (folder / file.relative_to(local).as_posix()).write_bytes(file.read_bytes())


def node_local(path: Location) -> Path:
    """A folder on this node's disk for what cannot live in an object store (an append-only file: the MLflow
    outbox): the path itself when it is local or shared, else ~/.cache/robustune/<scheme>/<bucket>/<key>."""
    if not isinstance(path, ObjectPath):
        return Path(path)
    return Path.home() / ".cache" / "robustune" / path.scheme / path.fs_path


def read_parquet(path: Location):
    import pyarrow.parquet as pq

    return pq.read_table(io.BytesIO(path.read_bytes()))


def write_parquet(table, path: Location) -> None:
    import pyarrow.parquet as pq

    buffer = io.BytesIO()
    pq.write_table(table, buffer)
    write_atomic(path, buffer.getvalue())


# ---------------------------------------------------------------------------------------- filesystems
def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def _s3_options(bucket: str) -> dict[str, Any]:
    """Endpoint and region from the environment; credentials stay with the AWS SDK's default chain."""
    import pyarrow.fs as pafs

    options: dict[str, Any] = {}
    endpoint = s3_endpoint()
    if endpoint:
        parsed = urlparse(endpoint if "://" in endpoint else f"https://{endpoint}")
        options.update(endpoint_override=parsed.netloc, scheme=parsed.scheme)
    region = os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION")
    if region:
        options["region"] = region
    elif endpoint:
        options["region"] = "us-east-1"  # S3-compatible servers ignore it; spares a region lookup
    else:
        with contextlib.suppress(OSError):  # AWS itself: the bucket's region (an error surfaces at the check)
            options["region"] = pafs.resolve_s3_region(bucket)
    return options


@functools.lru_cache(maxsize=None)
def object_filesystem(scheme: str, bucket: str, *, probe: bool = False):
    """The pyarrow filesystem of an object store (one per process and bucket). `probe`: short timeouts and
    few retries, for the check before any work."""
    import pyarrow.fs as pafs

    if scheme == "s3":
        attempts, timeout = (2, 10) if probe else (6, 120)
        return pafs.S3FileSystem(connect_timeout=5 if probe else 30, request_timeout=timeout,
                                 retry_strategy=pafs.AwsStandardS3RetryStrategy(max_attempts=attempts),
                                 **_s3_options(bucket))
    if scheme == "gs":
        import datetime

        return pafs.GcsFileSystem(retry_time_limit=datetime.timedelta(seconds=10 if probe else 120))
    raise StorageError(f"unsupported object store {scheme!r}")


# ---------------------------------------------------------------------------------------------- checks
def check_storage(root: Location) -> None:
    """Before any work: an object store at `root` answers, its bucket exists and the credentials may write and
    read it; and, once Ray is connected, every node sees `root` (`check_nodes_see`). StorageError names the
    URI, what failed and what to do; nothing stays behind."""
    if isinstance(root, ObjectPath):
        _check_object_store(root)
    check_nodes_see(root)


def _endpoint_of(root: ObjectPath) -> str:
    if root.scheme == "s3":
        return s3_endpoint() or "AWS S3"
    return "Google Cloud Storage"


def _explain(root: ObjectPath, error: BaseException) -> str:
    """What an object-store error means for the user, and what to do about it."""
    text = str(error)
    endpoint = _endpoint_of(root)
    variables = ("AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY (or the node's instance profile)" if root.scheme == "s3"
                 else "GOOGLE_APPLICATION_CREDENTIALS (or the VM's service account)")
    if any(word in text for word in ("NETWORK_CONNECTION", "curlCode", "Could not connect", "Couldn't connect",
                                     "Timeout", "timed out", "Name or service not known")):
        setting = "AWS_ENDPOINT_URL" if root.scheme == "s3" else "the network"
        return (f"cannot reach the object store at {endpoint} for {root}; check {setting} and that the server "
                f"is up and reachable from this machine")
    if any(word in text for word in ("ACCESS_DENIED", "AccessDenied", "INVALID_ACCESS_KEY_ID", "InvalidAccessKeyId",
                                     "SIGNATURE_DOES_NOT_MATCH", "SignatureDoesNotMatch", "403", "401",
                                     "Unauthorized", "Forbidden", "credentials")):
        return (f"the object store at {endpoint} refused the credentials for {root} ({_first_line(text)}); set "
                f"{variables} to a key that may read and write this bucket")
    if "NO_SUCH_BUCKET" in text or "NoSuchBucket" in text or "does not exist" in text:
        return _missing_bucket(root)
    return f"cannot use the storage {root}: {_first_line(text)}"


def _missing_bucket(root: ObjectPath) -> str:
    make = f"aws s3 mb s3://{root.bucket}" if root.scheme == "s3" else f"gcloud storage buckets create gs://{root.bucket}"
    return (f"bucket {root.bucket!r} of {root} does not exist at {_endpoint_of(root)}; create it ({make}) or set "
            f"tracking.output_dir (or {OUTPUT_DIR_ENV}) to a bucket that exists")


def _first_line(text: str) -> str:
    return (text.strip().splitlines() or [""])[0][:300]


def _check_object_store(root: ObjectPath) -> None:
    import pyarrow.fs as pafs

    fs = object_filesystem(root.scheme, root.bucket, probe=True)
    try:
        bucket = fs.get_file_info(root.bucket)
    except OSError as error:
        raise StorageError(_explain(root, error)) from error
    if bucket.type == pafs.FileType.NotFound:
        raise StorageError(_missing_bucket(root))
    probe = f"{root.fs_path}/{PROBE_PREFIX}{secrets.token_hex(4)}"
    try:
        with fs.open_output_stream(probe) as stream:
            stream.write(b"robustune")
        with fs.open_input_stream(probe) as stream:
            stream.read()
    except OSError as error:
        raise StorageError(_explain(root, error)) from error
    finally:
        with contextlib.suppress(OSError):
            fs.delete_file(probe)


def _read_probe(path: str) -> str:
    """On one node: the probe's content, or why it cannot be read there."""
    try:
        where = location(path)
        if isinstance(where, ObjectPath):  # few retries: a node that cannot reach the store says so soon
            with object_filesystem(where.scheme, where.bucket, probe=True).open_input_stream(where.fs_path) as stream:
                return stream.read().decode()
        return where.read_text()
    except Exception as error:  # a node without the mount, credentials or endpoint
        return f"ERROR {type(error).__name__}: {_first_line(str(error))}"


def check_nodes_see(root: Location) -> None:
    """On a multi-node Ray cluster, every node must see the same storage: a probe written here is read by a
    task on each other node (a local folder that only this machine has fails this). Nothing to do before Ray
    is connected, or on one node."""
    import ray

    if not ray.is_initialized():
        return
    this_node = ray.get_runtime_context().get_node_id()
    others = [node for node in ray.nodes() if node.get("Alive") and node["NodeID"] != this_node]
    if not others:
        return
    missing = [folder for folder in [root, *root.parents] if not folder.exists()] if isinstance(root, Path) else []
    probe = root / f"{PROBE_PREFIX}{secrets.token_hex(4)}"
    token = secrets.token_hex(8)
    try:
        root.mkdir(parents=True, exist_ok=True)
        probe.write_text(token)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        task = ray.remote(_read_probe)
        futures = {node["NodeManagerAddress"] + " " + node["NodeID"][:8]: task.options(
            num_cpus=0, max_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)).remote(str(probe))
            for node in others}
        seen = dict(zip(futures, ray.get(list(futures.values()), timeout=120)))
    finally:
        with contextlib.suppress(OSError):
            probe.unlink(missing_ok=True)
        for folder in missing:  # the folders the probe created, innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
    blind = {node: answer for node, answer in seen.items() if answer != token}
    if not blind:
        return
    nodes = "; ".join(f"node {node}: {answer if answer.startswith('ERROR') else 'reads other content'}"
                      for node, answer in sorted(blind.items()))
    if isinstance(root, ObjectPath):
        raise StorageError(f"the storage {root} is not readable from every node of the Ray cluster ({nodes}); "
                           "give every node the same endpoint and credentials (the AWS_* or GOOGLE_* variables "
                           "in clusters/*.yaml)")
    raise StorageError(f"the storage {root} is a folder on this machine that {len(blind)} other node(s) of the Ray "
                       f"cluster do not see ({nodes}); on a cluster whose nodes share no disk set "
                       f"tracking.output_dir (or {OUTPUT_DIR_ENV}) to an object store (s3://bucket/prefix, "
                       "gs://bucket/prefix) or to a path every node mounts (NFS)")
