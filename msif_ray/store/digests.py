"""Digests of what a stage reads: files, directories and settings, by content, never by path.

Every stage of a run is keyed by ``digest(...)`` of its named inputs (``pipeline/keys.py``), and every
corpus shard is named by its file's digest (``store.data.shard_id``), so that

- a file rewritten in place (same path, new content) is seen as new;
- an unchanged file moved or copied elsewhere is recognised, and nothing is recomputed;
- two machines (or home directories) holding the same files compute the same keys and seeds.

``file_digest(url)``
    A local file: the sha256 of its bytes, read in 8 MiB chunks. Memoised on disk in
    ``$MSIF_CACHE/digests.json`` (``config.cache_root()``) by (real path, size, mtime_ns), so an
    unchanged multi-GB file is hashed once, not at every run; a file modified less than
    ``RACY_SECONDS`` before it was hashed is not memoised (a second write within the same clock
    tick could keep its size and mtime). The cache is shared by processes: it is updated under a
    file lock and replaced atomically. A file whose content changes while its size and mtime_ns are
    restored (on purpose) is not seen; delete the cache to force hashing.

    A remote file (``s3://`` ... through fsspec): its size and ETag as the store reports them,
    else its size and modification time when the store gives no ETag. This follows content for
    objects written whole (an ETag changes with the bytes); a copy may change an ETag (multipart
    uploads), in which case the digest changes and the work is recomputed: it is never wrongly
    reused. The same object on S3 and on a local disk have different digests.

``tree_digest(url)``
    A directory (a model or tokenizer): the digest of the sorted (relative name, file digest) of its
    files; hidden files and folders (``.cache/``, ``.DS_Store``...) are left out. ``include``
    restricts it to matching names (the tokenizer's files of a model directory, see
    ``TOKENIZER_FILES``). Remote directories digest the listing as ``models.content_key`` does
    (relative name, size, ETag else mtime), with ``remote_version`` choosing the version field.

``digest(*parts)``
    16 hex digits of the sha256 of the JSON of ``parts`` (sorted keys; other objects by ``str``):
    the key of a stage or of a set of inputs.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import os
import threading
import time
import uuid
from collections.abc import Iterable

import fsspec
from filelock import FileLock

from msif_ray.config import cache_root

CHUNK = 8 << 20  # bytes read at a time when hashing
RACY_SECONDS = 2.0  # a file modified this recently is hashed but not memoised
CACHE_NAME = "digests.json"

# The files of a model directory that make up its tokenizer (a tokenizer's key must not change when
# only the weights beside it do).
TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "added_tokens.json", "vocab*", "merges.txt",
                   "*.model", "spiece*", "chat_template*")

_memo: dict[str, list] = {}  # this process's view of the on-disk cache: real path -> [size, mtime_ns, sha256]
_memo_lock = threading.Lock()


def digest(*parts: object) -> str:
    """16 hex digits of the sha256 of ``parts`` as JSON: the key of a stage or a set of inputs."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:16]


def is_remote(url: str) -> bool:
    return "://" in url and not url.startswith("file://")


def file_digest(url: str) -> str:
    """The content digest of one file (64 hex digits): see the module docstring."""
    return file_digests([url])[0]


def file_digests(urls: Iterable[str]) -> list[str]:
    """``file_digest`` of each file, with one update of the on-disk cache for all of them."""
    values, learned = [], {}
    for url in urls:
        if is_remote(url):
            from msif_ray.store.storage import with_retries

            fs, path = fsspec.core.url_to_fs(url)
            values.append(remote_file_digest(with_retries(lambda: fs.info(path), f"stat {url}")))
        else:
            values.append(_local_digest(os.path.realpath(url.removeprefix("file://")), learned))
    if learned:
        _remember(learned)
    return values


def remote_version(info: dict) -> str:
    """The version of a remote object from its listing: its ETag, else its modification time."""
    version = info.get("ETag") or info.get("etag")
    if version:
        return "etag:" + str(version).strip('"')
    return "mtime:" + str(info.get("LastModified") or info.get("mtime") or info.get("created"))


def remote_file_digest(info: dict) -> str:
    return hashlib.sha256(json.dumps(["remote", info.get("size"), remote_version(info)]).encode()).hexdigest()


def tree_digest(url: str, include: Iterable[str] | None = None) -> str:
    """The digest of a directory's files (relative name and file digest of each), 16 hex digits.

    ``include``: glob patterns on file names (not paths); only matching files count, or every file
    when none matches.
    """
    patterns = tuple(include or ())
    if is_remote(url):
        from msif_ray.store.storage import with_retries

        fs, root = fsspec.core.url_to_fs(url)
        root = root.rstrip("/")
        listing = with_retries(lambda: fs.find(root, detail=True), f"list {url}")
        files = {name[len(root):].lstrip("/"): remote_file_digest(info) for name, info in listing.items()}
    else:
        root = url.removeprefix("file://")
        if not os.path.isdir(root):
            raise FileNotFoundError(f"{url}: not a directory")
        files = {}
        for folder, dirs, names in os.walk(root):
            dirs[:] = [d for d in dirs if not d.startswith(".")]
            for name in names:
                if not name.startswith(".") and not name.endswith(".lock"):
                    path = os.path.join(folder, name)
                    files[os.path.relpath(path, root).replace(os.sep, "/")] = path
        files = dict(zip(files, file_digests(files.values())))
    if patterns:
        chosen = {n: d for n, d in files.items() if any(fnmatch.fnmatch(n.rsplit("/", 1)[-1], p) for p in patterns)}
        files = chosen or files
    return digest("tree", sorted(files.items()))


# --------------------------------------------------------------------------- the on-disk cache of local digests


def _cache_path() -> str:
    return str(cache_root() / CACHE_NAME)


def _local_digest(path: str, learned: dict[str, list]) -> str:
    """The sha256 of a local file, from the cache when its size and mtime match; new entries go into ``learned``."""
    stat = os.stat(path)
    with _memo_lock:
        if not _memo:
            _memo.update(_read_cache(_cache_path()))
        entry = _memo.get(path)
        if entry is not None and entry[0] == stat.st_size and entry[1] == stat.st_mtime_ns:
            return entry[2]
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
    value = sha.hexdigest()
    after = os.stat(path)
    stable = (after.st_size, after.st_mtime_ns) == (stat.st_size, stat.st_mtime_ns)
    if stable and time.time_ns() - stat.st_mtime_ns > RACY_SECONDS * 1e9:
        learned[path] = [stat.st_size, stat.st_mtime_ns, value]
    return value


def _read_cache(name: str) -> dict[str, list]:
    try:
        with open(name) as f:
            cached = json.load(f)
        return cached if isinstance(cached, dict) else {}
    except (OSError, ValueError):  # no cache yet, or an unreadable one: hashing again is always safe
        return {}


def _remember(entries: dict[str, list]) -> None:
    """Add entries to the shared cache: under its lock, merged with what other processes wrote."""
    name = _cache_path()
    try:
        os.makedirs(os.path.dirname(name), exist_ok=True)
        with FileLock(name + ".lock", timeout=60):
            cached = _read_cache(name)
            cached.update(entries)
            partial = f"{name}.{uuid.uuid4().hex[:8]}.partial"
            with open(partial, "w") as f:
                json.dump(cached, f)
            os.replace(partial, name)
    except OSError:  # a read-only or full cache folder: the digest is still right, only not memoised
        cached = entries
    with _memo_lock:
        _memo.update(cached)


def tokenizer_digest(tokenizer) -> str:
    """A loaded fast tokenizer's content (vocabulary, merges, normalisation, special tokens), whatever
    files it came from: what the corpus gradient index's rows depend on."""
    return digest(tokenizer.backend_tokenizer.to_str())
