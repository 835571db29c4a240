"""The run directory: named artifacts under one root, local or on an object store, via fsspec.

``RunDir("runs/x")`` and ``RunDir("s3://bucket/prefix")`` behave the same. Artifacts are
addressed by relative names with ``/`` separators (``factors/pretrain.safetensors``).

Every write is atomic: a reader sees the old content or the new one, never a part. Locally the
bytes go to a temporary file in the same folder, renamed over the target; on an object store a
single PUT is atomic already. Formats are safetensors, Parquet and JSON only, never pickle.
Credentials come from the environment (fsspec / boto's usual chain) and are never logged.
"""

from __future__ import annotations

import json
import os
import posixpath
import struct
import uuid
from typing import Any, Iterable

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors


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

    def exists(self, name: str) -> bool:
        self.fs.invalidate_cache()  # another process may have written since this one last listed
        return self.fs.exists(self.path(name))

    def read_bytes(self, name: str) -> bytes:
        try:
            return self.fs.cat_file(self.path(name))
        except FileNotFoundError:
            raise FileNotFoundError(f"no artifact {name!r} in run directory {self.url()}") from None

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write ``data`` atomically, creating parent folders as needed."""
        path = self.path(name)
        if self.is_local:
            _write_local_atomically(path, data)
        else:
            self.fs.pipe_file(path, data)

    def size(self, name: str) -> int:
        """Bytes of an artifact."""
        return int(self.fs.size(self.path(name)))

    def list(self, prefix: str = "") -> list[str]:
        """The names of all artifacts under ``prefix`` (recursively), sorted; empty when there is none."""
        self.fs.invalidate_cache()
        start = self.path(prefix)
        if not self.fs.exists(start):
            return []
        return sorted(posixpath.relpath(p, self.root) for p in self.fs.find(start))

    def remove(self, name: str) -> None:
        """Delete an artifact (or a folder of them); nothing happens when it does not exist."""
        if self.exists(name):
            self.fs.rm(self.path(name), recursive=True)

    # ----------------------------------------------------------------------- formats

    def write_json(self, name: str, value: Any) -> None:
        self.write_bytes(name, (json.dumps(value, indent=2) + "\n").encode("utf-8"))

    def read_json(self, name: str) -> Any:
        return json.loads(self.read_bytes(name))

    def save_tensors(self, name: str, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
        """Save contiguous CPU-or-device tensors as safetensors, with string metadata."""
        self.write_bytes(name, save_safetensors(tensors, metadata))

    def load_tensors(self, name: str, keys: Iterable[str] | None = None) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        """The tensors (on CPU) and the string metadata of a safetensors artifact.

        With ``keys``, only those tensors are read, by byte ranges (one layer of a file of many).
        """
        if keys is None:
            data = self.read_bytes(name)
            return load_safetensors(data), safetensors_metadata(data)
        header = self.tensor_header(name)
        start = 8 + header.pop("__size__")
        metadata = header.pop("__metadata__", {})
        tensors = {}
        for key in keys:
            if key not in header:
                raise KeyError(f"no tensor {key!r} in {self.url(name)}")
            info = header[key]
            lo, hi = info["data_offsets"]
            data = self.fs.cat_file(self.path(name), start=start + lo, end=start + hi) if hi > lo else b""
            dtype = _SAFETENSORS_DTYPES[info["dtype"]]
            tensors[key] = torch.frombuffer(bytearray(data), dtype=dtype).reshape(info["shape"]) if data else \
                torch.zeros(info["shape"], dtype=dtype)
        return tensors, metadata

    def tensor_header(self, name: str) -> dict[str, Any]:
        """The JSON header of a safetensors artifact (tensor names, dtypes, shapes, offsets), read alone."""
        path = self.path(name)
        try:
            (size,) = struct.unpack("<Q", self.fs.cat_file(path, start=0, end=8))
        except FileNotFoundError:
            raise FileNotFoundError(f"no artifact {name!r} in run directory {self.url()}") from None
        header = json.loads(self.fs.cat_file(path, start=8, end=8 + size))
        header["__size__"] = size
        return header

    def write_parquet(self, name: str, table: pa.Table) -> None:
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.write_bytes(name, sink.getvalue().to_pybytes())

    def read_parquet(self, name: str) -> pa.Table:
        return pq.read_table(pa.BufferReader(self.read_bytes(name)))


_SAFETENSORS_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                       "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
                       "BOOL": torch.bool}


def safetensors_metadata(data: bytes) -> dict[str, str]:
    """The ``__metadata__`` of safetensors bytes: an 8-byte little-endian header size, then a JSON header."""
    (header_size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + header_size]).get("__metadata__", {})


def _write_local_atomically(path: str, data: bytes) -> None:
    """Write to a temporary name in the target's folder, then rename it over the target."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = f"{path}.{uuid.uuid4().hex}.tmp"
    try:
        with open(temporary, "wb") as f:
            f.write(data)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
