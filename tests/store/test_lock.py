"""The run-directory lock: two runs at once (separate processes, local and on moto S3), a stale lock
left by a killed run taken over, the S3 lease kept alive by its heartbeat, and `msif run` refused
while another run holds the lock. Re-entrant within one thread, not across threads; a lease lost
by a run in a non-main thread stops that thread. ``Pipeline.run()`` (the Python API) takes the
same lock and makes the same early checks as ``msif run``."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from lock_holder import held_by_another_thread

from msif_ray.cli import EXIT_LOCKED, main
from msif_ray.config import config_from_dict
from msif_ray.store.lock import API, LOCK_NAME, Holder, LockHeldError, LockLostError, RunDirLock
from msif_ray.store.layout import MANIFEST
from msif_ray.store.storage import RunDir

REPO = Path(__file__).resolve().parents[2]
# A run holding the lock: waits for the file `go` (so that every process starts at once, after its
# imports), takes the lock, says so, holds it for HOLD seconds. Exit 3 with the message when locked.
HOLDER = """
import os, sys, time
from msif_ray.store.lock import LockHeldError, RunDirLock
from msif_ray.store.storage import RunDir
url, ttl, hold, go = sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
while not os.path.exists(go):
    time.sleep(0.01)
try:
    with RunDirLock(RunDir(url), ttl=ttl):
        print("acquired", os.getpid(), flush=True)
        time.sleep(hold)
except LockHeldError as err:
    print(err, file=sys.stderr)
    sys.exit(3)
"""


def start_holders(url: str, count: int, go: Path, ttl: float = 30, hold: float = 3) -> list[subprocess.Popen]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    return [subprocess.Popen([sys.executable, "-c", HOLDER, url, str(ttl), str(hold), str(go)], env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(count)]


def wait_acquired(process: subprocess.Popen, timeout: float = 60) -> None:
    line = process.stdout.readline()
    assert line.startswith("acquired"), (line, process.stderr.read() if process.poll() is not None else "")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_two_runs_at_once_one_runs_the_other_names_the_holder(where, tmp_path, request):
    url = str(tmp_path / "run") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/run"
    go = tmp_path / "go"
    processes = start_holders(url, 2, go)
    time.sleep(0.5)
    go.touch()
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in processes]
    codes = sorted(code for code, _, _ in results)
    assert codes == [0, 3], results
    (_, winner_out, _), = [r for r in results if r[0] == 0]
    (_, _, loser_err), = [r for r in results if r[0] == 3]
    winner_pid = winner_out.split()[1]
    assert f"pid {winner_pid}" in loser_err and "locked by `msif run` on host" in loser_err, loser_err
    assert not RunDir(url).exists(LOCK_NAME)  # released


def test_stale_local_lock_of_a_killed_run_is_taken_over(tmp_path):
    go = tmp_path / "go"
    go.touch()
    [holder] = start_holders(str(tmp_path / "run"), 1, go, hold=60)
    wait_acquired(holder)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    messages = []
    with RunDirLock(RunDir(tmp_path / "run"), log=messages.append):
        assert RunDir(tmp_path / "run").read_json(LOCK_NAME)["pid"] == os.getpid()
    assert len(messages) == 1 and "taking over the stale lock" in messages[0] and f"pid {holder.pid}" in messages[0]


def test_s3_lease_is_renewed_while_held_and_taken_over_once_its_holder_died(s3_bucket, tmp_path):
    url = f"{s3_bucket}/run"
    go = tmp_path / "go"
    go.touch()
    ttl = 2.0  # seconds; the holder renews every ttl/3
    [holder] = start_holders(url, 1, go, ttl=ttl, hold=60)
    wait_acquired(holder)
    time.sleep(2 * ttl)  # without renewals the lease would be stale by now
    with pytest.raises(LockHeldError, match=f"pid {holder.pid}"):
        RunDirLock(RunDir(url)).acquire()
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    with pytest.raises(LockHeldError):  # its last renewal is younger than the lease
        RunDirLock(RunDir(url)).acquire()
    time.sleep(ttl + 1.5)  # the object store's clock has a one-second resolution
    messages = []
    with RunDirLock(RunDir(url), log=messages.append):
        assert RunDir(url).read_json(LOCK_NAME)["pid"] == os.getpid()
    assert len(messages) == 1 and "taking over the stale lock" in messages[0] and f"pid {holder.pid}" in messages[0]
    assert not RunDir(url).exists(LOCK_NAME)


def test_msif_run_refused_while_another_run_holds_the_lock(world, tmp_path, capsys):
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(world.config(tmp_path / "run")))
    with held_by_another_thread(str(tmp_path / "run")):
        capsys.readouterr()
        assert main(["run", str(config)]) == EXIT_LOCKED
        message = capsys.readouterr().err
        assert not (tmp_path / "run" / MANIFEST).exists()  # the refused run wrote nothing
        RunDir(tmp_path / "run").write_json(MANIFEST, {"stages": {}})
        assert main(["status", str(tmp_path / "run")]) == 0
        assert "locked by `msif run` on host" in capsys.readouterr().out
    assert message.startswith("msif: error: run directory") and f"pid {os.getpid()}" in message, message


# --------------------------------------------------------------------------- re-entrancy and threads


def acquire_in_another_thread(url: str) -> BaseException | None:
    """What taking the lock of ``url`` in a new thread raised (None: it was taken, and released)."""
    outcome: list[BaseException | None] = []

    def take() -> None:
        try:
            with RunDirLock(RunDir(url), log=lambda line: None):
                outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - returned
            outcome.append(err)

    thread = threading.Thread(target=take)
    thread.start()
    thread.join(timeout=60)
    return outcome[0]


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_lock_is_reentrant_in_its_thread_and_refused_to_another(where, tmp_path, request):
    url = str(tmp_path / "run") if where == "local" else f"{request.getfixturevalue('s3_bucket')}/run"
    with RunDirLock(RunDir(url), API):
        with RunDirLock(RunDir(url), "tune"):  # nested: only counts, the holder stays the outermost
            with RunDirLock(RunDir(url)):
                assert Holder.parse(RunDir(url).read_bytes(LOCK_NAME)).command == API
        refused = acquire_in_another_thread(url)  # still held after the nested ones let go
        assert isinstance(refused, LockHeldError), refused
        assert "locked by the Python API (`Pipeline.run()`) on host" in str(refused)
        assert f"pid {os.getpid()}" in str(refused)
    assert not RunDir(url).exists(LOCK_NAME)  # released fully by the outermost
    assert acquire_in_another_thread(url) is None


def test_a_lease_lost_by_a_run_in_another_thread_stops_that_thread(s3_bucket):
    """The heartbeat finds its lease taken over (here: lock.json overwritten by another holder) and
    raises LockLostError in the thread that holds the lock, not in the main thread."""
    url = f"{s3_bucket}/run"
    ttl = 1.5  # seconds: renewed every 0.5 s
    holding, outcome = threading.Event(), []

    def run() -> None:
        try:
            with RunDirLock(RunDir(url), API, ttl=ttl, log=lambda line: None):
                holding.set()
                deadline = time.monotonic() + 30
                while time.monotonic() < deadline:  # a run's work
                    time.sleep(0.05)
            outcome.append(None)
        except BaseException as err:  # noqa: BLE001 - checked below
            outcome.append(err)

    thread = threading.Thread(target=run, name="background-run")
    thread.start()
    assert holding.wait(timeout=30)
    RunDir(url).write_bytes(LOCK_NAME, Holder.me("run", ttl).to_bytes())  # another run took the lease over
    thread.join(timeout=20)
    assert not thread.is_alive(), "the thread that lost its lease went on"
    [error] = outcome
    assert isinstance(error, LockLostError) and "taken over by another run" in str(error), error
    assert isinstance(error.__cause__, LockLostError)  # what the heartbeat raised in the thread
    assert RunDir(url).exists(LOCK_NAME)  # the other run's lease is left alone


# --------------------------------------------------------------------------- the Python API


def test_pipeline_run_is_refused_while_another_process_holds_the_lock(world, tmp_path):
    from msif_ray.pipeline.run import Pipeline

    run_dir = tmp_path / "run"
    go = tmp_path / "go"
    go.touch()
    [holder] = start_holders(str(run_dir), 1, go, hold=60)
    try:
        wait_acquired(holder)
        config = config_from_dict(world.config(run_dir), world.root)
        with pytest.raises(LockHeldError, match=f"locked by `msif run` on host .*, pid {holder.pid}"):
            Pipeline(config, log=lambda line: None).run()
        assert sorted(os.listdir(run_dir)) == [LOCK_NAME, LOCK_NAME + ".lock"]  # the refused run wrote nothing
    finally:
        holder.kill()
        holder.wait()


UNREACHABLE = """
import sys
from msif_ray.config import load_config
from msif_ray.distributed.runtime import ClusterUnreachableError
from msif_ray.pipeline.run import Pipeline
try:
    Pipeline(load_config(sys.argv[1]), log=lambda line: None).run()
except ClusterUnreachableError as err:
    print(err, file=sys.stderr)
    sys.exit(2)
"""


def test_pipeline_run_joins_ray_address_and_names_an_unreachable_one(world, tmp_path):
    """As ``msif run`` (test_cli's secrets test), in a fresh process: this one's Ray is up already.
    Ray's client gives up on the address after 3 tries of 1 s."""
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(world.config(tmp_path / "run", **{"ray.address": f"ray://127.0.0.1:{port}"})))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {
        "PYTHONPATH": str(REPO), "RAY_CLIENT_INITIAL_CONNECTION_TIMEOUT_S": "1",
        "RAY_CLIENT_MAX_CONNECTION_TIMEOUT_S": "1"}
    done = subprocess.run([sys.executable, "-c", UNREACHABLE, str(config)], env=env, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    assert f"ray.address: cannot reach the Ray cluster at ray://127.0.0.1:{port}" in done.stderr
    assert os.listdir(tmp_path / "run") == []  # lock released, nothing written
