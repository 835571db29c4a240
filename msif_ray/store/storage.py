"""The run directory: named artifacts under one root, local or on an object store, via fsspec.

``RunDir("runs/x")`` and ``RunDir("s3://bucket/prefix")`` behave the same. Artifacts are
addressed by relative names with ``/`` separators (``factors/pretrain.safetensors``).

Every write is atomic: a reader sees the old content or the new one, never a part. Locally the
bytes go to a temporary file in the same folder, renamed over the target; on an object store a
single PUT is atomic already. Formats are safetensors, Parquet and JSON only, never pickle.
Credentials come from the environment (fsspec / boto's usual chain) and are never logged.
Local writes are durable too: the temporary file is fsynced before the rename and its folder
after it, so a power cut leaves the old artifact or the new one, never an empty file.

Every artifact verifies itself on read; any damage raises ``DamagedArtifactError`` naming the
URL and what is wrong. ``save_tensors`` records a sha256 per tensor in the safetensors metadata
(``DIGESTS_KEY``) and ``load_tensors`` checks the header, the data section's length against the
file's size and the digest of every tensor it reads, also when it reads only some of them by
byte ranges (a reduce job reads one layer of a large checkpoint), hence per-tensor digests rather
than one per file. Hashing costs about 0.7 s per GB written or read (sha256 at ~1.4 GB/s on one
core of the development machine, an AMD EPYC with SHA extensions), small beside the passes that
produce or use those bytes. Files written before digests existed still load, unverified.
Parquet is written with page checksums and read with their verification (the footer itself has
no checksum: damage there is found only when Arrow cannot parse it). JSON that does not parse
is damaged too.

Object stores fail transiently (timeouts, 5xx, throttling) a few times a night, and are sometimes
unreachable for a minute or two. botocore and s3fs retry a request a few times within seconds; on
top of that every ``RunDir`` operation is retried whole by ``with_retries``, for errors that
``is_transient`` recognises: with exponential backoff and full jitter (sleep uniform in
[0, min(RETRY_CAP, RETRY_BASE · 2^attempt)] seconds), until both RETRY_ATTEMPTS attempts and
RETRY_SECONDS have passed, so that an outage shorter than RETRY_SECONDS is waited out whatever
the jitter drew. Every operation is idempotent (a PUT of whole bytes, a read, a list,
a delete), so a retry can neither lose nor duplicate an artifact. A missing bucket or a denied
permission is not transient: ``check_storage`` turns it into a ``StorageError`` naming the path
before any work starts.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import posixpath
import random
import shutil
import socket
import struct
import time
import uuid
from typing import TYPE_CHECKING, Any, Callable, Iterable, TypeVar

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem
from msif_ray.errors import UserError

if TYPE_CHECKING:  # torch is imported where tensors are saved or loaded: the lock and the checks need no torch
    import torch

log = logging.getLogger(__name__)
T = TypeVar("T")

RETRY_ATTEMPTS = int(os.environ.get("MSIF_STORAGE_RETRIES", "8"))  # attempts per operation, first one included
RETRY_SECONDS = float(os.environ.get("MSIF_STORAGE_RETRY_SECONDS", "300"))  # ... and at least this long
RETRY_BASE = 0.5  # seconds: the backoff ceiling of the first retry, doubled per attempt
RETRY_CAP = 30.0  # seconds: the backoff ceiling never grows past this
# S3 error codes (and HTTP statuses) that mean "try again later".
TRANSIENT_CODES = frozenset({
    "SlowDown", "Throttling", "ThrottlingException", "RequestLimitExceeded", "TooManyRequests", "RequestTimeout",
    "RequestTimeoutException", "InternalError", "ServiceUnavailable", "500", "502", "503", "504", "429",
})


class StorageError(UserError, OSError):
    """A run directory or input location that cannot be used (missing bucket, no permission)."""


class StorageFullError(StorageError):
    """The disk (or quota) under a local run directory or index is full: what was finished is kept."""


class DamagedArtifactError(UserError, ValueError):
    """An artifact whose bytes are not what was written: truncated, emptied, a byte flipped.

    ``root`` is the URL of the store holding it and ``name`` its artifact name there, so that the
    pipeline can discard it and what declares it done (``layout.records_covering``) and compute it
    again. It pickles by those fields, so that Ray re-raises it in the driver as this class.
    """

    def __init__(self, root: str, name: str, problem: str):
        self.root, self.name, self.problem = root, name, problem
        super().__init__(f"damaged artifact {posixpath.join(root, name)}: {problem}")

    def __reduce__(self) -> tuple:
        return type(self), (self.root, self.name, self.problem)



class RunDir:
    """Named artifacts under a root directory (a local path or a URL such as ``s3://bucket/prefix``)."""

    def __init__(self, root: str | os.PathLike):
        self.fs, self.root = fsspec.core.url_to_fs(str(root))
        self.root = self.root.rstrip("/")
        self.is_local = isinstance(self.fs, LocalFileSystem)

    def __repr__(self) -> str:
        return f"RunDir({self.url()!r})"

    # ----------------------------------------------------------------------- names

    def path(self, name: str) -> str:
        """The filesystem path of ``name`` (no protocol); ``name`` must stay inside the run directory."""
        if name.startswith("/") or ".." in name.split("/"):
            raise ValueError(f"artifact name {name!r} must be relative and stay inside the run directory")
        return posixpath.join(self.root, name) if name else self.root

    def url(self, name: str = "") -> str:
        """A path or URL for ``name`` that ``RunDir``, fsspec and pyarrow accept; ``url()`` is the root."""
        path = self.path(name)
        return path if self.is_local else self.fs.unstrip_protocol(path)

    # ----------------------------------------------------------------------- bytes

    def _fresh(self, name: str) -> fsspec.AbstractFileSystem:
        """The file system, with no cached listing of ``name``'s folders: s3fs answers a size (which a
        whole read asks first) from a listing cached before ``name`` was written with "not found"."""
        self.fs.invalidate_cache(self.path(name))
        return self.fs

    def exists(self, name: str) -> bool:
        def exists() -> bool:
            self.fs.invalidate_cache()  # another process may have written since this one last listed
            return self.fs.exists(self.path(name))
        return with_retries(exists, f"exists {self.url(name)}")

    def read_bytes(self, name: str) -> bytes:
        try:
            return with_retries(lambda: self._fresh(name).cat_file(self.path(name)), f"read {self.url(name)}")
        except FileNotFoundError:
            raise FileNotFoundError(f"no artifact {name!r} in run directory {self.url()}") from None

    def write_bytes(self, name: str, data: bytes) -> int:
        """Write ``data`` atomically, creating parent folders as needed; returns its size (markers record it)."""
        path = self.path(name)
        if self.is_local:
            _write_local_atomically(path, data)
        else:
            with_retries(lambda: self.fs.pipe_file(path, data), f"write {self.url(name)}")
        return len(data)

    def copy(self, source: str, target: str) -> None:
        """Copy one artifact to another name: atomically (local), or as one server-side object copy."""
        if self.is_local:
            with open(self.path(source), "rb") as f:
                _write_local_atomically(self.path(target), f.read())
        else:
            with_retries(lambda: self.fs.copy(self.path(source), self.path(target)),
                         f"copy {self.url(source)} to {self.url(target)}")

    def size(self, name: str) -> int:
        """Bytes of an artifact."""
        return int(with_retries(lambda: self._fresh(name).size(self.path(name)), f"size {self.url(name)}"))

    def sizes(self, prefix: str = "") -> dict[str, int]:
        """name -> bytes of every artifact under ``prefix`` (recursively): one listing, where
        ``size`` per artifact would cost one request each on an object store."""
        def find() -> dict[str, Any]:
            self.fs.invalidate_cache()
            start = self.path(prefix)
            return self.fs.find(start, detail=True) if self.fs.exists(start) else {}
        found = with_retries(find, f"list {self.url(prefix)}")
        return {posixpath.relpath(p, self.root): int(info["size"]) for p, info in found.items()}

    def list(self, prefix: str = "") -> list[str]:
        """The names of all artifacts under ``prefix`` (recursively), sorted; empty when there is none."""
        return sorted(self.sizes(prefix))

    def remove(self, name: str) -> None:
        """Delete an artifact (or a folder of them); nothing happens when it does not exist."""
        def remove() -> None:
            self.fs.invalidate_cache()
            if self.fs.exists(self.path(name)):
                self.fs.rm(self.path(name), recursive=True)
        with_retries(remove, f"remove {self.url(name)}")

    # ----------------------------------------------------------------------- formats

    def write_json(self, name: str, value: Any) -> None:
        self.write_bytes(name, (json.dumps(value, indent=2) + "\n").encode("utf-8"))

    def read_json(self, name: str) -> Any:
        """A JSON artifact; ``DamagedArtifactError`` when it does not parse (truncated, emptied)."""
        data = self.read_bytes(name)
        try:
            return json.loads(data)
        except ValueError as err:
            raise self.damaged(name, f"not valid JSON ({err})") from None

    def damaged(self, name: str, problem: str) -> DamagedArtifactError:
        return DamagedArtifactError(self.url(), name, problem)

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
        """Save contiguous CPU-or-device tensors as safetensors, with string metadata and the sha256
        of each tensor's bytes (``DIGESTS_KEY``); returns the file's size."""
        from safetensors.torch import save as save_safetensors

        digests = {key: hashlib.sha256(tensor_bytes(tensor)).hexdigest() for key, tensor in tensors.items()}
        return self.write_bytes(name, save_safetensors(tensors, (metadata or {}) | {DIGESTS_KEY: json.dumps(digests)}))

    def load_tensors(self, name: str, keys: Iterable[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors (on CPU) and the string metadata (the caller's, without the digests) of a
        safetensors artifact, each tensor verified against its digest.

        With ``keys``, only those tensors are read, by byte ranges (one layer of a file of many).
        """
        if keys is None:
            data = self.read_bytes(name)
            header = self._verified_header(name, lambda lo, hi: data[lo:hi], len(data))
            keys = tensor_names(header)
            read = lambda lo, hi: data[lo:hi]  # noqa: E731
        else:
            header = self._verified_header(name, lambda lo, hi: self._read_range(name, lo, hi), self.size(name))
            read = lambda lo, hi: self._read_range(name, lo, hi) if hi > lo else b""  # noqa: E731
        metadata = dict(header.get("__metadata__", {}))
        digests = json.loads(metadata.pop(DIGESTS_KEY, "{}"))
        names = set(tensor_names(header))
        tensors = {}
        for key in keys:
            if key not in names:
                raise KeyError(f"no tensor {key!r} in {self.url(name)}")
            info = header[key]
            lo, hi = (header["__start__"] + offset for offset in info["data_offsets"])
            tensors[key] = self._tensor(name, key, info, read(lo, hi), digests.get(key))
        return tensors, metadata

    def tensor_header(self, name: str) -> dict[str, Any]:
        """The JSON header of a safetensors artifact (tensor names, dtypes, shapes, offsets), read alone."""
        return self._header(name, lambda lo, hi: self._read_range(name, lo, hi))

    def _header(self, name: str, read: Callable[[int, int], bytes]) -> dict[str, Any]:
        """The header, parsed; ``__start__`` is where the data section starts (safetensors: an
        8-byte little-endian header size, then the JSON header, then the tensors' bytes)."""
        prefix = read(0, 8)
        if len(prefix) < 8:
            raise self.damaged(name, f"{len(prefix)} bytes, shorter than a safetensors header")
        (size,) = struct.unpack("<Q", prefix)
        try:
            header = json.loads(read(8, 8 + size))
        except ValueError as err:
            raise self.damaged(name, f"its safetensors header does not parse ({err})") from None
        if not isinstance(header, dict):
            raise self.damaged(name, "its safetensors header is not a JSON object")
        header["__start__"] = 8 + size
        return header

    def _verified_header(self, name: str, read: Callable[[int, int], bytes], file_size: int) -> dict[str, Any]:
        """The header, checked against the file: the tensors' bytes fill the data section exactly,
        and when the file has digests, there is one per tensor."""
        header = self._header(name, read)
        try:
            end = max((header[key]["data_offsets"][1] for key in tensor_names(header)), default=0)
            digests = json.loads(header.get("__metadata__", {}).get(DIGESTS_KEY, "null"))
        except (ValueError, TypeError, KeyError, IndexError) as err:
            raise self.damaged(name, f"its safetensors header is malformed ({err!r})") from None
        if header["__start__"] + end != file_size:
            raise self.damaged(name, f"{file_size} bytes where its header describes {header['__start__'] + end}")
        if digests is not None and set(digests) != set(tensor_names(header)):
            raise self.damaged(name, "its tensors are not the ones its digests name")
        return header

    def _tensor(self, name: str, key: str, info: dict, data: bytes, expected: str | None) -> torch.Tensor:
        """Tensor ``key`` from its bytes, which must match their recorded sha256 (None: an older
        file without digests) and the dtype and shape of the header."""
        import torch

        if expected is not None and hashlib.sha256(data).hexdigest() != expected:
            raise self.damaged(name, f"tensor {key!r} does not match its sha256")
        try:
            dtype = getattr(torch, SAFETENSORS_DTYPES[info["dtype"]])
            if not data:
                return torch.zeros(info["shape"], dtype=dtype)
            return torch.frombuffer(bytearray(data), dtype=dtype).reshape(info["shape"])
        except (KeyError, TypeError, ValueError, RuntimeError) as err:
            raise self.damaged(name, f"tensor {key!r} does not fit its dtype and shape ({err})") from None

    def _read_range(self, name: str, start: int, end: int) -> bytes:
        try:
            return with_retries(lambda: self._fresh(name).cat_file(self.path(name), start=start, end=end),
                                f"read {self.url(name)}[{start}:{end}]")
        except FileNotFoundError:
            raise FileNotFoundError(f"no artifact {name!r} in run directory {self.url()}") from None

    def write_parquet(self, name: str, table: pa.Table) -> int:
        """Write ``table`` with a CRC per page; returns the file's size."""
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, write_page_checksum=True)
        return self.write_bytes(name, sink.getvalue().to_pybytes())

    def read_parquet(self, name: str) -> pa.Table:
        """A Parquet artifact, its page checksums verified; ``DamagedArtifactError`` when Arrow fails."""
        data = self.read_bytes(name)
        try:
            return pq.read_table(pa.BufferReader(data), page_checksum_verification=True)
        except (pa.ArrowException, OSError) as err:
            raise self.damaged(name, f"not a readable Parquet file ({err})") from None


DIGESTS_KEY = "msif.sha256"  # safetensors metadata: a JSON object, tensor name -> sha256 of its bytes (hex)
SAFETENSORS_DTYPES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
                      "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool"}  # names in torch


# --------------------------------------------------------------------------- transient errors


def is_transient(err: BaseException) -> bool:
    """Whether ``err`` (or an error it was raised from) is worth retrying: timeouts, dropped
    connections, 5xx and throttling. Missing objects, denied access and bad requests are not."""
    from botocore.exceptions import ClientError, ConnectionError as BotoConnectionError, HTTPClientError

    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, (FileNotFoundError, PermissionError, FileExistsError, IsADirectoryError)):
            return False
        if isinstance(err, ClientError):
            response = err.response or {}
            code = str(response.get("Error", {}).get("Code", ""))
            status = response.get("ResponseMetadata", {}).get("HTTPStatusCode") or 0
            return code in TRANSIENT_CODES or status >= 500 or status == 429
        if isinstance(err, (BotoConnectionError, HTTPClientError, TimeoutError, socket.timeout, ConnectionError)):
            return True  # botocore's ReadTimeout / ConnectTimeout / EndpointConnection / ConnectionClosed errors
        if isinstance(err, OSError) and err.errno in (errno.EBUSY, errno.EREMOTEIO, errno.ETIMEDOUT, errno.ECONNRESET):
            return True  # s3fs's translation of SlowDown / 503 and InternalError / 500
        if type(err).__module__.startswith("aiohttp") and type(err).__name__.startswith(("Server", "ClientConnect", "ClientPayload", "ClientOS")):
            return True
        err = err.__cause__ or err.__context__
    return False


def with_retries(operation: Callable[[], T], what: str, attempts: int | None = None, seconds: float | None = None,
                 sleep: Callable[[float], None] = time.sleep, clock: Callable[[], float] = time.monotonic) -> T:
    """``operation()``, retried on transient errors with exponential backoff and full jitter, until
    ``attempts`` (RETRY_ATTEMPTS) attempts have been made and ``seconds`` (RETRY_SECONDS) have passed.

    ``what`` names the operation and its path in the log line of each retry. The last error is
    raised as is when the retries are spent or when it is not transient.
    """
    attempts = attempts or RETRY_ATTEMPTS
    seconds = RETRY_SECONDS if seconds is None else seconds
    start, attempt = clock(), 0
    while True:
        attempt += 1
        try:
            return operation()
        except Exception as err:  # noqa: BLE001 - re-raised unless transient
            if not is_transient(err) or (attempt >= attempts and clock() - start >= seconds):
                raise
            delay = random.uniform(0, min(RETRY_CAP, RETRY_BASE * 2 ** (attempt - 1)))
            log.warning("%s: transient error (%s: %s); retry %d in %.1fs (%.0f s so far)", what, type(err).__name__,
                        err, attempt, delay, clock() - start)
            sleep(delay)


def check_storage(url: str, key: str, write: bool = True) -> None:
    """Fail early, naming ``key`` and ``url``, when a location cannot be used.

    Object stores: the bucket must exist and (``write``) accept a small probe object, written
    and deleted again; a bucket that exists but denies access says so. Local paths: the nearest
    existing parent must be a writable directory. Raises ``StorageError``.
    """
    fs, path = fsspec.core.url_to_fs(url)
    if isinstance(fs, LocalFileSystem):
        parent = path
        while not os.path.exists(parent):
            parent = os.path.dirname(parent)
        if not os.path.isdir(parent) or (write and not os.access(parent, os.W_OK | os.X_OK)):
            raise StorageError(f"{key}: cannot write under {url} ({parent} is not a writable directory)")
        return
    bucket = path.split("/", 1)[0]
    try:
        with_retries(lambda: _head_bucket(fs, bucket), f"check bucket {bucket}", seconds=0)  # a wrong endpoint fails fast
    except FileNotFoundError:
        raise StorageError(f"{key}: bucket {bucket!r} of {url} does not exist (or this account cannot see it); "
                           "create it or fix the path") from None
    except PermissionError as err:
        raise StorageError(f"{key}: access denied to bucket {bucket!r} of {url} ({err}); check the credentials "
                           "and the bucket policy") from None
    if write:
        probe = f"{path.rstrip('/')}/.msif-write-check-{uuid.uuid4().hex}"
        try:
            with_retries(lambda: fs.pipe_file(probe, b""), f"write {url}")
            with_retries(lambda: fs.rm(probe), f"remove {url}")
        except PermissionError as err:
            raise StorageError(f"{key}: cannot write under {url}: access denied ({err}); check the credentials "
                               "and the bucket policy") from None
        except FileNotFoundError as err:
            raise StorageError(f"{key}: cannot write under {url} ({err}); check that the bucket exists") from None


def check_run_dir_shared(url: str, key: str, alive_nodes: int) -> None:
    """Refuse a local run directory on a Ray cluster of more than one node.

    Workers on other nodes would write their shard results to their own disks, where the driver
    never finds them. Raises ``StorageError`` naming the path and the fix.
    """
    fs, _ = fsspec.core.url_to_fs(url)
    if alive_nodes > 1 and isinstance(fs, LocalFileSystem):
        raise StorageError(f"{key}: {url} is a local path, but the Ray cluster has {alive_nodes} nodes: workers on "
                           "other nodes would write to their own disks. Use shared storage (s3://bucket/prefix)")


def _head_bucket(fs: fsspec.AbstractFileSystem, bucket: str) -> None:
    """Raise FileNotFoundError / PermissionError unless ``bucket`` exists and is accessible."""
    fs.invalidate_cache()
    if hasattr(fs, "call_s3"):  # s3fs: one HEAD request, whatever the bucket holds
        fs.call_s3("head_bucket", Bucket=bucket)
    elif not fs.exists(bucket):
        raise FileNotFoundError(bucket)


def tensor_names(header: dict[str, Any]) -> list[str]:
    """The tensors of a parsed safetensors header (``RunDir.tensor_header``), in its order."""
    return [key for key in header if key not in ("__metadata__", "__start__")]


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The bytes safetensors writes for ``tensor``: its elements, contiguous, little-endian (as is every
    platform torch runs on)."""
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy())


def disk_full(path: str, size: int) -> StorageFullError:
    """The error for a local write of ``size`` bytes to ``path`` that found its disk or quota full."""
    folder = os.path.dirname(path)
    while not os.path.isdir(folder):
        folder = os.path.dirname(folder)
    usage = shutil.disk_usage(folder)
    return StorageFullError(f"no space left on the device holding {folder} (writing {size:,} bytes to {path}; "
                            f"{usage.free:,} of {usage.total:,} bytes free): free space there or move the run "
                            "directory (or index.path) to a larger volume, then run again: what is finished is kept")


def _write_local_atomically(path: str, data: bytes) -> None:
    """Write to a temporary name in the target's folder, fsync it, rename it over the target, then
    fsync the folder, so that the rename itself survives a power cut."""
    folder = os.path.dirname(path)
    temporary = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        os.makedirs(folder, exist_ok=True)
        with open(temporary, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temporary, path)
    except OSError as err:
        if err.errno in (errno.ENOSPC, errno.EDQUOT):
            raise disk_full(path, len(data)) from err
        raise
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
