"""One run at a time per run directory: ``RunDirLock``.

Two runs on one run directory would race on the manifest, and one's cleanup would delete the
other's partial results. ``msif run`` (``nightly``, ``tune``) and ``Pipeline.run()`` therefore hold
a lock on the run directory for their whole length::

    with RunDirLock(RunDir(url)):
        ...                           # a second run now fails at once with LockHeldError

The lock is re-entrant within one thread of one process: taken again by the thread that holds it
(``msif tune``'s trials, ``Pipeline.run()`` inside ``msif run``), it only counts, and is released
when the outermost holder lets go. Another process, or another thread of this one, gets
``LockHeldError``.

Local run directory: an OS file lock (``filelock``: ``flock`` on ``<run_dir>/lock.json.lock``),
released by the kernel when its process dies, so a dead holder can never block a later run.
The holder (host, pid, start time) is written beside it to ``lock.json`` for the message a second
run prints; a ``lock.json`` found while the file lock is free was left by a run that died, and is
taken over, saying so.

Object store (``s3://``): a lease object ``<run_dir>/lock.json`` created with a conditional PUT
(``If-None-Match: *``: exactly one of several concurrent creators succeeds). Its holder renews it
from a heartbeat thread every ``ttl / 3`` seconds with a PUT conditional on the ETag it last wrote
(``If-Match``). A lease not renewed for ``ttl`` seconds is stale (its holder died or lost the
network); the next run takes it over, again with an ``If-Match`` PUT, so that of two runs taking
over at once only one wins. Age is measured on the object store's clock (its ``Date`` header
minus the lease's ``Last-Modified``), so clocks of different machines never need to agree. A
holder whose renewal finds the lease taken over has lost it: the heartbeat stops the thread that
holds the lock, and the run stops with ``LockLostError`` rather than keep writing beside another run.
"""

from __future__ import annotations

import _thread
import ctypes
import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from email.utils import parsedate_to_datetime
from typing import Callable

from filelock import FileLock, Timeout

from msif_ray.store.storage import RunDir, with_retries
from msif_ray.errors import UserError

LOCK_NAME = "lock.json"
LEASE_TTL = float(os.environ.get("MSIF_LOCK_TTL", "300"))  # seconds an S3 lease lives without renewal
API = "api"  # the holder's command when the run was started from Python (``Pipeline.run()``)


class LockHeldError(UserError, RuntimeError):
    """Another live run holds the run directory's lock; the message names it."""


class LockLostError(RuntimeError):
    """This run's lease was taken over while it ran (its heartbeat could not renew it in time)."""


@dataclass(frozen=True)
class Holder:
    """Who holds a lock: written into ``lock.json``."""

    host: str
    pid: int
    started: str  # ISO 8601, UTC
    command: str
    token: str  # unique per acquisition: tells this run's lease from a later one
    ttl_seconds: float

    @staticmethod
    def me(command: str, ttl: float) -> Holder:
        return Holder(socket.gethostname(), os.getpid(), datetime.now(timezone.utc).isoformat(timespec="seconds"),
                      command, uuid.uuid4().hex, ttl)

    @staticmethod
    def parse(data: bytes) -> Holder | None:
        try:
            return Holder(**json.loads(data))
        except (ValueError, TypeError):
            return None

    def describe(self) -> str:
        what = "the Python API (`Pipeline.run()`)" if self.command == API else f"`msif {self.command}`"
        return f"{what} on host {self.host}, pid {self.pid}, started {self.started}"

    def to_bytes(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode()


# (run directory URL, thread id) -> the outermost RunDirLock this thread holds on it
_held: dict[tuple[str, int], RunDirLock] = {}
_held_guard = threading.Lock()


def held_by_this_thread(store: RunDir) -> bool:
    """Whether the calling thread holds the lock of ``store`` (a nested acquisition would only count)."""
    with _held_guard:
        return (store.url(), threading.get_ident()) in _held


class RunDirLock:
    """An exclusive lock on a run directory, re-entrant within one thread; a context manager.

    ``command`` names the holder's subcommand (``API`` for ``Pipeline.run()``).
    """

    def __init__(self, store: RunDir, command: str = "run", ttl: float = LEASE_TTL,
                 log: Callable[[str], None] = print):
        self.store = store
        self.holder = Holder.me(command, ttl)
        self.ttl = ttl
        self.log = log
        self.lost = False
        self._file_lock: FileLock | None = None
        self._etag: str | None = None
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None
        self._key = (store.url(), 0)  # and the holding thread's id, set by acquire()
        self._depth = 0  # acquisitions of this thread now held (on the outermost lock)
        self._outer: RunDirLock | None = None  # set while this one is a nested acquisition

    def __enter__(self) -> RunDirLock:
        self.acquire()
        return self

    def __exit__(self, kind, error, traceback) -> None:
        self.release()
        if self.lost:  # set on the outermost lock only: a nested one lets the error through to it
            raise LockLostError(f"{self.store.url(LOCK_NAME)}: this run's lease was taken over by another run while "
                                "it ran (the heartbeat could not renew it in time); its results may be incomplete: "
                                "rerun when the other run has finished") from error

    # ----------------------------------------------------------------------- acquire / release

    def acquire(self) -> None:
        """Take the lock, or raise ``LockHeldError`` naming the live holder. A stale lock is taken over.

        Already held by this thread: the acquisition only counts (the holder recorded stays the outermost's).
        """
        key = (self.store.url(), threading.get_ident())
        with _held_guard:
            outer = _held.get(key)
            if outer is not None:
                outer._depth += 1
                self._outer = outer
                return
        if self.store.is_local:
            self._acquire_local()
        else:
            self._acquire_lease()
        self._key, self._depth = key, 1
        with _held_guard:
            _held[key] = self
        if not self.store.is_local:
            self._heartbeat = threading.Thread(target=self._renew_forever, name="msif-lock-heartbeat", daemon=True)
            self._heartbeat.start()

    def release(self) -> None:
        """Give the lock up (the lease object or holder file is deleted); safe to call twice.

        A nested acquisition only counts down; the lock is given up when the count reaches zero.
        """
        with _held_guard:
            holder = self._outer or self
            self._outer = None
            if holder._depth == 0:
                return
            holder._depth -= 1
            if holder._depth > 0:
                return
            _held.pop(holder._key, None)
        holder._give_up()

    def _give_up(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        if self._file_lock is not None:
            self.store.remove(LOCK_NAME)
            self._file_lock.release()
            self._file_lock = None
            self._remove_lock_file_if_alone()
        elif self._etag is not None:
            if not self.lost and self._current()[1] == self._etag:  # still ours: a stale-taken lease is not deleted
                self.store.remove(LOCK_NAME)
            self._etag = None

    # ----------------------------------------------------------------------- local: a file lock

    def _acquire_local(self) -> None:
        os.makedirs(self.store.root, exist_ok=True)
        lock = FileLock(self.store.path(LOCK_NAME) + ".lock", timeout=0)
        try:
            lock.acquire()
        except Timeout:
            previous = self._read_holder()
            for _ in range(50):  # the holder writes who it is right after taking the lock: give it 5 s
                if previous is not None:
                    break
                time.sleep(0.1)
                previous = self._read_holder()
            who = previous.describe() if previous else "another process (no holder recorded yet)"
            raise LockHeldError(f"run directory {self.store.url()} is locked by {who}; wait for that run to finish, "
                                "or stop it") from None
        self._file_lock = lock
        previous = self._read_holder()
        if previous is not None:
            self.log(f"[lock] taking over the stale lock of {previous.describe()}: that process is gone")
        self.store.write_bytes(LOCK_NAME, self.holder.to_bytes())

    def _remove_lock_file_if_alone(self) -> None:
        """A run that failed before writing anything leaves its run directory as it found it.

        The lock file is kept otherwise: unlinking it while a concurrent starter has it open could
        let two runs lock different files of one name. Here that starter would have found an empty
        run directory, so at worst two runs that both fail early race.
        """
        lock_file = self.store.path(LOCK_NAME) + ".lock"
        try:
            if os.listdir(self.store.root) == [os.path.basename(lock_file)]:
                os.remove(lock_file)
        except OSError:
            pass

    def _read_holder(self) -> Holder | None:
        try:
            return Holder.parse(self.store.read_bytes(LOCK_NAME))
        except FileNotFoundError:
            return None

    # ----------------------------------------------------------------------- object store: a lease

    def _s3(self, method: str, **kwargs) -> dict:
        bucket, key, _ = self.store.fs.split_path(self.store.path(LOCK_NAME))
        return with_retries(lambda: self.store.fs.call_s3(method, Bucket=bucket, Key=key, **kwargs),
                            f"{method} {self.store.url(LOCK_NAME)}")

    def _put(self, **condition) -> str | None:
        """PUT this holder's lease under ``condition``; its new ETag, or None when the condition failed."""
        try:
            return self._s3("put_object", Body=self.holder.to_bytes(), ContentType="application/json", **condition)["ETag"]
        except (FileExistsError, OSError) as err:
            if _precondition_failed(err):
                return None
            raise

    def _current(self) -> tuple[Holder | None, str | None, float]:
        """The lease now stored: holder, ETag, and seconds since it was last written (object store's clock)."""
        try:
            response = self._s3("get_object")
        except FileNotFoundError:
            return None, None, 0.0
        body = response["Body"]
        data = _read_body(self.store.fs, body)
        now = parsedate_to_datetime(response["ResponseMetadata"]["HTTPHeaders"]["date"])
        return Holder.parse(data), response["ETag"], (now - response["LastModified"]).total_seconds()

    def _acquire_lease(self) -> None:
        for _ in range(5):  # a lease released between our PUT and our GET: try again
            self._etag = self._put(IfNoneMatch="*")
            if self._etag is not None:
                return
            holder, etag, age = self._current()
            if etag is None:
                continue
            if holder is not None and holder.token == self.holder.token:
                self._etag = etag  # our own PUT succeeded, its reply was lost and the retry found it
                return
            ttl = holder.ttl_seconds if holder else self.ttl
            if age <= ttl:
                who = holder.describe() if holder else "an unreadable lease"
                raise LockHeldError(f"run directory {self.store.url()} is locked by {who} (lease renewed {age:.0f}s ago, "
                                    f"expires in {ttl - age:.0f}s); wait for that run to finish, or stop it")
            self._etag = self._put(IfMatch=etag)
            if self._etag is not None:
                who = holder.describe() if holder else "an unreadable lease"
                self.log(f"[lock] taking over the stale lock of {who}: not renewed for {age:.0f}s (lease {ttl:.0f}s)")
                return
        raise LockHeldError(f"run directory {self.store.url()}: could not take the lock; another run is taking it")

    def _renew_forever(self) -> None:
        """Heartbeat: renew the lease every ttl/3 s while the run holds it."""
        last_renewed = time.monotonic()
        while not self._stop.wait(self.ttl / 3):
            try:
                etag = self._put(IfMatch=self._etag)
            except Exception as err:  # noqa: BLE001 - keep trying until the lease would expire
                if time.monotonic() - last_renewed < self.ttl:
                    self.log(f"[lock] could not renew the lease ({type(err).__name__}: {err}); trying again")
                    continue
                etag = None
            if etag is None:
                self.lost = True
                self.log(f"[lock] lost the lock on {self.store.url()}: another run took it over; stopping this run")
                if not self._stop.is_set():  # the run has not let go of the lock yet
                    self._stop_holder()
                return
            self._etag, last_renewed = etag, time.monotonic()

    def _stop_holder(self) -> None:
        """Stop the thread that holds the lock: ``__exit__`` turns what it raises into ``LockLostError``.

        The main thread gets a KeyboardInterrupt (``interrupt_main``: a signal, so it also wakes a
        ``sleep`` or ``wait``). Any other thread (a notebook's background run, a service's worker
        thread) has ``LockLostError`` raised in it asynchronously with ``PyThreadState_SetAsyncExc``,
        CPython's one way to stop another thread: interrupting the main thread would stop the wrong
        code and leave the run going. The exception arrives when the thread next runs Python code,
        so a thread blocked in a long C call (a ``ray.get``) stops once that call returns.
        """
        thread = self._key[1]
        if thread == threading.main_thread().ident:
            _thread.interrupt_main()
        else:
            ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(thread), ctypes.py_object(LockLostError))


def _precondition_failed(err: BaseException) -> bool:
    """Whether ``err`` (s3fs's translation of a ClientError, or the error itself) is S3's 412 PreconditionFailed."""
    while err is not None:
        if isinstance(err, FileExistsError):
            return True
        response = getattr(err, "response", None)
        if isinstance(response, dict) and response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
            return True
        err = err.__cause__
    return False


def _read_body(fs, body) -> bytes:
    """The bytes of an aiobotocore streaming body, read on s3fs's event loop."""
    from fsspec.asyn import sync

    async def read() -> bytes:
        async with body as stream:
            return await stream.read()

    return sync(fs.loop, read)
