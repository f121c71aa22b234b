"""One writer per run folder: a live holder is named and refused, a stale or same-owner lock is taken over."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
import time

import pytest

from scripts.lib.cli import UserError
from scripts.lib.run import LOCK_NAME, STALE_AFTER_ENV, RunLock, Stopper, make_accelerator, read_lock_holder


def test_a_second_writer_is_refused_with_the_holder_named(tmp_path):
    with RunLock(tmp_path / "run"):
        holder = read_lock_holder(tmp_path / "run")
        assert holder.pid == os.getpid()
        with pytest.raises(UserError, match=f"in use by another trainer \\(pid {os.getpid()} on "):
            RunLock(tmp_path / "run").acquire()
    assert not (tmp_path / "run" / LOCK_NAME).exists()  # released
    with RunLock(tmp_path / "run"):  # and free again
        pass


def test_a_lock_whose_process_is_gone_is_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    first = RunLock(tmp_path)
    first.acquire()
    first._stop.set()  # as if its process had died: no more heartbeats, no release
    data = json.loads((tmp_path / LOCK_NAME).read_text())
    data["pid"] = int(dead.stdout)
    (tmp_path / LOCK_NAME).write_text(json.dumps(data))
    second = RunLock(tmp_path)
    second.acquire()
    assert read_lock_holder(tmp_path).token == second.token
    with pytest.raises(UserError, match="lost the lock"):
        first.check_held()
    second.release()


def test_a_lock_from_another_host_expires_with_its_heartbeat(tmp_path, monkeypatch):
    now = time.time()
    (tmp_path / LOCK_NAME).write_text(
        json.dumps(
            {"owner": "", "host": "other-node", "pid": 1, "started": now - 999, "heartbeat": now - 30, "token": "x"}
        )
    )
    monkeypatch.setenv(STALE_AFTER_ENV, "60")
    with pytest.raises(UserError, match="other-node"):
        RunLock(tmp_path).acquire()
    monkeypatch.setenv(STALE_AFTER_ENV, "20")
    lock = RunLock(tmp_path)
    lock.acquire()
    lock.release()


def test_the_same_run_owner_takes_over_at_once(tmp_path):
    now = time.time()
    (tmp_path / LOCK_NAME).write_text(
        json.dumps(
            {"owner": "chain-1", "host": "container-a", "pid": 7, "started": now, "heartbeat": now, "token": "x"}
        )
    )
    with pytest.raises(UserError, match="run owner chain-1"):
        RunLock(tmp_path, owner="chain-2").acquire()
    with RunLock(tmp_path, owner="chain-1") as lock:
        assert read_lock_holder(tmp_path).token == lock.token


def test_the_heartbeat_keeps_a_lock_fresh(tmp_path, monkeypatch):
    monkeypatch.setenv(STALE_AFTER_ENV, "0.4")
    with RunLock(tmp_path):
        first = read_lock_holder(tmp_path).heartbeat
        time.sleep(0.3)
        assert read_lock_holder(tmp_path).heartbeat > first
        with pytest.raises(UserError, match="in use"):
            RunLock(tmp_path).acquire()


def _race(folder: str, results) -> None:
    try:
        RunLock(folder).acquire()  # never released: the winner keeps it until its process ends
        results.put("won")
        time.sleep(1.0)
    except UserError:
        results.put("refused")


def test_of_processes_racing_for_one_stale_lock_exactly_one_wins(tmp_path):
    (tmp_path / LOCK_NAME).write_text(
        json.dumps({"owner": "", "host": "gone", "pid": 1, "started": 0, "heartbeat": 0, "token": "old"})
    )
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    racers = [context.Process(target=_race, args=(str(tmp_path), results)) for _ in range(4)]
    for racer in racers:
        racer.start()
    outcomes = sorted(results.get(timeout=60) for _ in racers)
    for racer in racers:
        racer.join()
    assert outcomes == ["refused", "refused", "refused", "won"]


def test_a_container_with_the_same_host_name_is_judged_by_its_heartbeat_not_our_pids(tmp_path):
    """Two containers may share a host name; a pid of another pid namespace tells nothing here."""
    import socket

    now = time.time()
    (tmp_path / LOCK_NAME).write_text(
        json.dumps(
            {
                "owner": "",
                "host": socket.gethostname(),
                "pid": 999999999,
                "started": now,
                "heartbeat": now,
                "token": "x",
                "machine": "same-name|other-boot|pid:[1]",
            }
        )
    )
    with pytest.raises(UserError, match="in use by another trainer"):
        RunLock(tmp_path).acquire()


def test_a_lock_that_is_a_folder_is_refused_in_one_line_and_left_alone(tmp_path):
    (tmp_path / LOCK_NAME).mkdir()
    with pytest.raises(UserError, match="is a folder, not this kit's lock file"):
        RunLock(tmp_path).acquire()
    assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_NAME]  # no .lock.stale-* left behind


def test_a_repeated_sigint_within_moments_is_the_same_keypress_a_later_one_stops_at_once(monkeypatch):
    import signal

    from scripts.lib import run

    clock = {"now": 100.0}
    monkeypatch.setattr(run.time, "monotonic", lambda: clock["now"])
    stopper = Stopper(make_accelerator("cpu", "no"))
    stopper._handle(signal.SIGINT, None)
    clock["now"] += 0.5
    stopper._handle(signal.SIGINT, None)  # relayed by a launcher: ignored, the save still happens
    assert stopper.signum == signal.SIGINT and stopper.reason(1, 2, 10) == "SIGINT"
    clock["now"] += run.REPEATED_SIGINT_S
    with pytest.raises(KeyboardInterrupt):
        stopper._handle(signal.SIGINT, None)
