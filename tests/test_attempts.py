"""scripts/lib/attempts.py on its own: exit statuses to outcomes, the lease, the exit-status wrapper, the status
lines. Whole chains of attempts run in tests/test_modal_app.py."""

from __future__ import annotations

import json
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from scripts.lib import attempts
from scripts.lib.cli import UserError


@pytest.mark.parametrize(
    "status, outcome",
    [
        (0, attempts.FINISHED),
        (2, attempts.FAILED),
        (75, attempts.CONTINUED),
        (130, attempts.INTERRUPTED),
        (143, attempts.INTERRUPTED),
        (1, attempts.CRASHED),
        (-9, attempts.CRASHED),
    ],
)
def test_every_exit_status_has_its_outcome(status, outcome):
    assert attempts.outcome_of(status) == outcome


@pytest.mark.parametrize(
    "statuses, signalled, expected",
    [
        ({0: 0, 1: 0}, None, 0),
        ({0: 75, 1: 75}, None, 75),
        ({0: 2, 1: 2}, None, 2),
        ({0: 143, 1: 2}, None, 2),  # rank 1's user error; rank 0 was stopped by the launcher
        ({0: 143, 1: 1}, None, 1),  # the launcher stopped rank 0 after rank 1 crashed: not a preemption
        ({0: 143, 1: 143}, signal.SIGINT, 130),
        ({1: 143}, signal.SIGTERM, 143),
        ({}, None, 1),
        ({0: 0, 1: 143}, signal.SIGINT, 0),  # finished just as the signal came
    ],
)
def test_one_exit_status_from_every_ranks_own(statuses, signalled, expected):
    assert attempts.launched_exit_status(statuses, signalled) == expected


def write_lock(run_dir: Path, owner: str, heartbeat_age_s: float, host: str, pid: int) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    now = time.time()
    lock = dict(owner=owner, host=host, pid=pid, started=now - 99, heartbeat=now - heartbeat_age_s, token="t")
    (run_dir / ".lock").write_text(json.dumps(lock))


def test_a_lease_with_a_recent_heartbeat_is_refused_even_if_its_pid_is_gone_on_a_host_of_the_same_name(tmp_path):
    # Containers can share a host name; the run lock alone would call this lock stale (same host, no such pid).
    write_lock(tmp_path / "run", "run/other", heartbeat_age_s=30, host=socket.gethostname(), pid=4_000_000)
    with pytest.raises(UserError, match=r"being written by another run \(pid 4000000 on .* \(run owner run/other\)"):
        with attempts.lease(tmp_path / "run", "run/mine"):
            pass


def test_a_lease_is_taken_over_when_stale_or_of_the_same_chain_and_released_after(tmp_path):
    write_lock(tmp_path / "a", "a/other", heartbeat_age_s=601, host="elsewhere", pid=1)
    write_lock(tmp_path / "b", "b/mine", heartbeat_age_s=1, host="elsewhere", pid=1)
    for run, owner in (("a", "a/mine"), ("b", "b/mine")):
        with attempts.lease(tmp_path / run, owner):
            assert json.loads((tmp_path / run / ".lock").read_text())["owner"] == owner
        assert not (tmp_path / run / ".lock").exists()


def test_the_exit_wrapper_records_the_scripts_status_and_keeps_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # restored afterwards: the wrapper sets the script's argv
    monkeypatch.setenv("RANK", "1")
    script = tmp_path / "stop.py"
    for body, status in (("raise SystemExit(75)", 75), ("pass", 0), ("raise SystemExit('error: x')", 1)):
        script.write_text(body)
        try:
            attempts.record_exit_main([str(tmp_path), str(script)])
        except SystemExit as stop:
            assert stop.code in (75, "error: x")
        assert (tmp_path / "rank1").read_text() == str(status)
    script.write_text("import sys; assert sys.argv[1:] == ['--flag', 'x']; raise RuntimeError('boom')")
    with pytest.raises(RuntimeError, match="boom"):
        attempts.record_exit_main([str(tmp_path), str(script), "--flag", "x"])
    assert (tmp_path / "rank1").read_text() == "1"


def test_periodic_runs_its_action_until_stopped():
    calls: list[float] = []
    with attempts.Periodic(lambda: calls.append(time.monotonic()), interval_s=0.01):
        deadline = time.monotonic() + 10
        while len(calls) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    stopped_at = len(calls)
    time.sleep(0.05)
    assert stopped_at >= 2 and len(calls) == stopped_at


def test_status_lines_of_a_run_in_its_second_attempt():
    now = 1_000_000.0
    journal = [
        {"event": "start", "attempt": 1, "call_id": "fc-1", "gpu": "A10G", "step": 0},
        {"event": "end", "attempt": 1, "call_id": "fc-1", "gpu": "A10G", "steps": [0, 80000], "outcome": "continued"},
        {"event": "start", "attempt": 2, "call_id": "fc-2", "gpu": "A10G", "step": 80000},
    ]
    status = {
        "state": "training",
        "step": 80500,
        "steps": 300000,
        "img_per_s": 431.7,
        "eta_s": 3 * 3600 + 60,
        "updated": now - 42,
        "host": "modal-1",
        "message": None,
        "newest_checkpoint": None,
        "newest_grid": None,
    }
    assert attempts.status_lines("dit-1", status, journal, now) == [
        "run dit-1: attempt 2 (fc-2 on A10G) running",
        "trainer: training at step 80500/300000, 432 img/s, ETA 3h01m, updated 42s ago on modal-1",
        "newest checkpoint: state/step_0080000; newest sample grid: -",  # from the journal: not saved since
        "  attempt 1 fc-1: steps 0-80000, continued",
    ]
    assert attempts.status_lines("dit-1", None, [], now) == [
        "run dit-1: no status yet (not started, or its first attempt is still starting)"
    ]
