"""A run directory's lock held by another thread of this process, for the length of a ``with`` block.

The lock is re-entrant within one thread: taken in the test's own thread, a run started there
would only count on it. Another thread's lock refuses it as another process's would.
"""

from __future__ import annotations

import threading
from contextlib import contextmanager
from typing import Iterator

from msif_ray.store.lock import RunDirLock
from msif_ray.store.storage import RunDir


@contextmanager
def held_by_another_thread(url: str, command: str = "run") -> Iterator[None]:
    taken, done = threading.Event(), threading.Event()
    failed: list[BaseException] = []

    def hold() -> None:
        try:
            with RunDirLock(RunDir(url), command, log=lambda line: None):
                taken.set()
                done.wait()
        except BaseException as err:  # noqa: BLE001 - raised in the test's thread
            failed.append(err)
            taken.set()

    thread = threading.Thread(target=hold, name="lock-holder", daemon=True)
    thread.start()
    taken.wait()
    if failed:
        raise failed[0]
    try:
        yield
    finally:
        done.set()
        thread.join()
    if failed:
        raise failed[0]
