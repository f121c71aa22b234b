"""One long training run as a chain of attempts, for platforms that bound each attempt (Modal: 24 h, preemption).

An attempt runs the trainer until it finishes, reaches its --time-limit, is stopped by a signal or fails. What comes
next follows from the trainer's exit status (scripts.lib.cli documents them):

    exit status         outcome       the platform then
    0                   finished      is done
    2 (user error)      failed        stops: a retry would fail the same way (the message is in training.log)
    75 (--time-limit)   continued     starts the next attempt: same run, same config, resumed from its checkpoint
    128 + N (signal)    interrupted   restarts this attempt (preemption is not a failure)
    anything else       crashed       retries it, in a fresh container

One writer per run: every attempt of a chain carries the chain's owner id in TINY_CATS_RUN_OWNER, so it takes the
run lock (scripts.lib.run_lock) over from an earlier attempt of the same chain at once, while another chain (a
rerun of the same run name) is refused with the holder named until the lock has had no heartbeat for
TINY_CATS_LOCK_STALE_S (600 s by default). The platform's storage must make the lock visible to other machines:
`run_attempt` commits right after taking it, and `Periodic` commits every COMMIT_INTERVAL_S while training.

Nothing here knows Modal: the platform passes in how to commit its storage and how to start the next attempt.
`python -m scripts.lib.attempts EXIT_DIR SCRIPT ARGS...` runs SCRIPT and records its exit status (see
`record_exit_main`), because a multi-process launcher reports 1 for every failure of its workers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import runpy
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from scripts.lib.checkpoints import list_complete_states, state_dir_name
from scripts.lib.cli import EXIT_SIGNAL_BASE, EXIT_TIME_LIMIT, EXIT_USER_ERROR, UserError
from scripts.lib.run import STATE_DIR
from scripts.lib.run import DEFAULT_STALE_AFTER_S, OWNER_ENV, STALE_AFTER_ENV, RunLock, read_lock_holder
from scripts.lib.run import append_log_line, format_duration

FINISHED, CONTINUED, INTERRUPTED, FAILED, CRASHED = "finished", "continued", "interrupted", "failed", "crashed"
JOURNAL_NAME = "attempts.jsonl"
# The lock's heartbeat is rewritten every stale/8 = 75 s; committing every 120 s means another container never sees
# a live lease older than ~3.5 min (75 + 120 s plus its own reload), far from the 600 s after which it is stale.
COMMIT_INTERVAL_S = 120.0
# Seconds torch's elastic agent (under `accelerate launch --multi_gpu`) gives its workers after a stop signal before
# SIGKILL (its default, 30 s, can cut a large model's final save short).
LAUNCHER_SHUTDOWN_TIMEOUT_S = 120


class AttemptCrashed(RuntimeError):
    """The trainer failed in a way a retry may fix (a CUDA error, a lost GPU, a killed process)."""


@dataclasses.dataclass(frozen=True)
class Chain:
    """Who an attempt belongs to and where it runs; handed unchanged to retries, and with index + 1 to the next."""

    owner: str  # the run lock's owner for every attempt of this run (see the module docstring)
    gpu: str
    index: int = 1  # the attempt's place in the chain; a restart or retry of it keeps the index
    secrets: tuple[str, ...] = ()

    @classmethod
    def start(cls, run_name: str, gpu: str, secrets: tuple[str, ...] = ()) -> Chain:
        return cls(owner=f"{run_name}/{uuid.uuid4().hex[:12]}", gpu=gpu, secrets=secrets)

    def next(self) -> Chain:
        return dataclasses.replace(self, index=self.index + 1)


@dataclasses.dataclass
class Exit:
    """How the trainer of one attempt ended: its exit status and, for a user error or a crash, why."""

    status: int
    message: str | None = None
    error: BaseException | None = None
    ranks: dict[int, int] | None = None  # each process's own exit status, under a multi-process launcher


def outcome_of(status: int) -> str:
    if status == 0:
        return FINISHED
    if status == EXIT_USER_ERROR:
        return FAILED
    if status == EXIT_TIME_LIMIT:
        return CONTINUED
    if status > EXIT_SIGNAL_BASE:
        return INTERRUPTED
    return CRASHED


# ---------------------------------------------------------------------------------------------------------
# The lease: the run lock, checked by heartbeat age first
# ---------------------------------------------------------------------------------------------------------
def stale_after_s() -> float:
    return float(os.environ.get(STALE_AFTER_ENV, DEFAULT_STALE_AFTER_S))


@contextlib.contextmanager
def lease(run_dir: Path, owner: str) -> Iterator[None]:
    """Hold the run's lock for a moment (bookkeeping between trainers), or raise a UserError naming its holder.

    A lock of another chain with a recent heartbeat is refused here first, in the words of a Modal run (RunLock
    would refuse it too: it judges pids only on its own machine, so containers sharing a host name go by heartbeat).
    """
    holder = read_lock_holder(run_dir)
    if holder is not None and holder.owner != owner and time.time() - holder.heartbeat < stale_after_s():
        raise UserError(
            f"run {run_dir.name} is being written by another run ({holder.describe()}) — wait for it, "
            f"stop it, or use another --run-name; a lease whose holder died expires {stale_after_s():.0f} "
            "s after its last heartbeat"
        )
    lock = RunLock(run_dir, owner=owner)
    lock.acquire()
    try:
        yield
    finally:
        lock.release()


@contextlib.contextmanager
def owner_env(owner: str) -> Iterator[None]:
    """TINY_CATS_RUN_OWNER for a trainer run in this process (restored afterwards: tests run many)."""
    previous = os.environ.get(OWNER_ENV)
    os.environ[OWNER_ENV] = owner
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(OWNER_ENV, None)
        else:
            os.environ[OWNER_ENV] = previous


# ---------------------------------------------------------------------------------------------------------
# Running the trainer: in this process, or under a multi-process launcher
# ---------------------------------------------------------------------------------------------------------
class Periodic:
    """Calls `action` every `interval_s` seconds in a thread while the `with` block runs (e.g. a volume commit)."""

    def __init__(self, action: Callable[[], None], interval_s: float):
        self.action, self.interval_s = action, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="periodic", daemon=True)

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self.action()

    def __enter__(self) -> Periodic:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join()


def run_in_process(main: Callable[..., Any], cfg: Any, owner: str, commit: Callable[[], None]) -> Exit:
    """`main(cfg, on_checkpoint)` here, committing after every checkpoint and every COMMIT_INTERVAL_S."""
    with owner_env(owner), Periodic(commit, COMMIT_INTERVAL_S):
        try:
            main(cfg, on_checkpoint=lambda _folder: commit())
        except UserError as error:
            return Exit(EXIT_USER_ERROR, str(error))
        except SystemExit as stop:  # --time-limit or a signal, after saving
            return Exit(stop.code if isinstance(stop.code, int) else 1)
        except KeyboardInterrupt:  # a signal before the training loop had its own handlers in place
            return Exit(EXIT_SIGNAL_BASE + signal.SIGINT)
        except Exception as error:  # noqa: BLE001 — a crash: the caller re-raises it so that the platform retries
            return Exit(1, f"{type(error).__name__}: {error}", error)
    return Exit(0)


def launch_command(script: Path, argv: list[str], num_processes: int, exit_dir: Path) -> list[str]:
    """`accelerate launch --multi_gpu` of `script`, each process wrapped so that it records its exit status."""
    launcher = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        str(num_processes),
    ]
    machine = ["--num_machines", "1", "--main_process_port", str(free_port())]
    return [*launcher, *machine, "-m", __name__, str(exit_dir), str(script), *argv]


def free_port() -> int:
    """A free local port for the processes' rendezvous (the fixed default collides with any other launch here)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_launched(
    script: Path, argv: list[str], num_processes: int, env: dict[str, str], commit: Callable[[], None]
) -> Exit:
    """The trainer on `num_processes` processes under `accelerate launch`, committing every COMMIT_INTERVAL_S.

    The launcher gets its own process group, and SIGINT/SIGTERM sent to this process go to all of it as SIGTERM:
    torch's elastic agent passes the signal it receives on to the workers, and a worker that gets SIGINT twice
    stops without saving (scripts.lib.stopping: a second Ctrl-C), while SIGTERM twice is harmless.
    """
    with tempfile.TemporaryDirectory() as exit_dir, Periodic(commit, COMMIT_INTERVAL_S):
        env = {**env, "TORCH_ELASTIC_SHUTDOWN_TIMEOUT": str(LAUNCHER_SHUTDOWN_TIMEOUT_S)}
        launcher = subprocess.Popen(
            launch_command(script, argv, num_processes, Path(exit_dir)), env=env, start_new_session=True
        )
        with forwarding_signals(launcher.pid) as received:
            launcher.wait()  # the agent waits for its workers (SIGKILL after the shutdown timeout) before it exits
        statuses = {int(path.name[4:]): int(path.read_text()) for path in Path(exit_dir).glob("rank*")}
    return Exit(launched_exit_status(statuses, received[0] if received else None), ranks=statuses)


@contextlib.contextmanager
def forwarding_signals(process_group: int) -> Iterator[list[int]]:
    """While the block runs, SIGINT/SIGTERM to this process become SIGTERM to `process_group`; yields the signals."""
    received: list[int] = []

    def forward(signum: int, _frame: Any) -> None:
        received.append(signum)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process_group, signal.SIGTERM)

    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield received
        return
    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield received
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def launched_exit_status(statuses: dict[int, int], signalled: int | None) -> int:
    """One exit status for a multi-process attempt from each rank's own (rank -> status; a killed rank has none).

    Rank 0 writes the checkpoints, so its word decides once it finished or saved at the time limit. A rank's
    signal status counts as a stop only if this process was signalled: otherwise the launcher tore the group down
    because another rank failed, which is a crash.
    """
    main = statuses.get(0)
    if EXIT_USER_ERROR in statuses.values():
        return EXIT_USER_ERROR
    if main in (0, EXIT_TIME_LIMIT):
        return main
    if signalled:
        return EXIT_SIGNAL_BASE + signalled
    return 1


def record_exit_main(argv: list[str]) -> None:
    """`python -m scripts.lib.attempts EXIT_DIR SCRIPT ARGS...`: run SCRIPT as `python SCRIPT ARGS...` would, and
    write its exit status to EXIT_DIR/rank<RANK> (read by `run_launched`)."""
    exit_dir, script, *script_argv = argv
    sys.argv = [script, *script_argv]
    status = 1  # an exception escaping the script is a crash
    try:
        runpy.run_path(script, run_name="__main__")
        status = 0
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
        raise
    finally:
        Path(exit_dir, f"rank{os.environ.get('RANK', '0')}").write_text(str(status))


# ---------------------------------------------------------------------------------------------------------
# One attempt, from the lease to what comes next
# ---------------------------------------------------------------------------------------------------------
def newest_step(run_dir: Path) -> int:
    states = list_complete_states(run_dir / STATE_DIR)
    return states[-1][0] if states else 0


def last_log_line(run_dir: Path) -> str | None:
    try:
        lines = (run_dir / "training.log").read_text(encoding="utf-8").strip().splitlines()
    except OSError:
        return None
    return lines[-1] if lines else None


def append_journal(run_dir: Path, **record: Any) -> None:
    """One line of <run>/attempts.jsonl: what each attempt of the run started from and how it ended."""
    with open(run_dir / JOURNAL_NAME, "a", encoding="utf-8") as handle:
        handle.write(json.dumps({"time": round(time.time(), 3), **record}) + "\n")


def read_journal(text: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def run_attempt(
    cfg: Any,
    chain: Chain,
    train: Callable[[], Exit],
    *,
    call_id: str,
    commit: Callable[[], None],
    continue_run: Callable[[Chain], str],
) -> dict[str, Any]:
    """One attempt of the run of `cfg`: take the lease, train, record, commit, then hand over (see the docstring).

    Returns the attempt's summary when the run finished, failed for good or continues in a new attempt (with the
    new call id); raises KeyboardInterrupt when it was interrupted and AttemptCrashed when it crashed.
    """
    run_dir = Path(cfg.output_dir) / cfg.run_name
    summary: dict[str, Any] = {"run": cfg.run_name, "attempt": chain.index, "call_id": call_id, "gpu": chain.gpu}
    try:
        with lease(run_dir, chain.owner):
            start_step = newest_step(run_dir)
            append_journal(run_dir, event="start", owner=chain.owner, step=start_step, **summary)
            log_attempt(run_dir, chain, call_id, f"starts at step {start_step}")
        commit()  # the lease, visible to other containers before the trainer writes anything
    except UserError as refused:  # another run holds the lease: write nothing, commit nothing
        return {**summary, "outcome": FAILED, "message": str(refused)}
    ended = train()
    outcome, message, end_step = outcome_of(ended.status), ended.message, newest_step(run_dir)
    if outcome == CONTINUED and end_step <= start_step:
        outcome, message = FAILED, f"stopped at its --time-limit without a new checkpoint (still step {end_step})"
    if outcome in (FAILED, CRASHED) and not message:  # a launcher's workers: their error is in training.log
        message = last_log_line(run_dir)
    summary.update(outcome=outcome, message=message, steps=[start_step, end_step], ranks=ended.ranks)
    close_attempt(run_dir, chain, summary, commit)
    if outcome == CONTINUED:
        summary["next_call_id"] = continue_run(chain.next())
    elif outcome == INTERRUPTED:
        raise KeyboardInterrupt  # the platform restarts the attempt; the next one resumes from the saved state
    elif outcome == CRASHED:
        raise AttemptCrashed(
            f"attempt {chain.index} of {cfg.run_name} crashed: {message or f'exit {ended.status}'}"
            f" — {run_dir / 'training.log'} has the details"
        ) from ended.error
    return summary


def log_attempt(run_dir: Path, chain: Chain, call_id: str, text: str) -> None:
    """A line about this attempt in the run's training.log (once the run has one)."""
    append_log_line(run_dir / "training.log", f"attempt {chain.index} ({call_id} on {chain.gpu}) {text}", level="INFO")


def close_attempt(run_dir: Path, chain: Chain, summary: dict[str, Any], commit: Callable[[], None]) -> None:
    """Journal and log how the attempt ended, then commit — unless another run took the lease meanwhile (its
    files are newer than ours: committing our view would overwrite them)."""
    start, end = summary["steps"]
    detail = f": {summary['message']}" if summary["message"] else ""
    try:
        with lease(run_dir, chain.owner):
            append_journal(run_dir, event="end", owner=chain.owner, **summary)
            log_attempt(
                run_dir, chain, summary["call_id"], f"covered steps {start}-{end}: {summary['outcome']}{detail}"
            )
    except UserError as taken:
        print(f"not committing attempt {chain.index}: {taken}", file=sys.stderr)
        return
    commit()


# ---------------------------------------------------------------------------------------------------------
# Where a run stands (for `status` commands)
# ---------------------------------------------------------------------------------------------------------
def status_lines(run: str, status: dict[str, Any] | None, journal: list[dict[str, Any]], now: float) -> list[str]:
    """Human lines from a run's status.json and attempts.jsonl: attempt, step, speed, ETA, newest outputs."""
    if status is None and not journal:
        return [f"run {run}: no status yet (not started, or its first attempt is still starting)"]
    lines = []
    if journal:
        last = journal[-1]
        state = "running" if last["event"] == "start" else last["outcome"]
        lines.append(f"run {run}: attempt {last['attempt']} ({last['call_id']} on {last['gpu']}) {state}")
    if status is not None:
        step, steps = status.get("step") or 0, status.get("steps") or 0
        speed = f", {status['img_per_s']:.0f} img/s" if status.get("img_per_s") else ""
        training = status["state"] == "training"
        eta = f", ETA {format_duration(status['eta_s'])}" if training and status.get("eta_s") else ""
        lines.append(
            f"trainer: {status['state']} at step {step}/{steps}{speed}{eta}, updated "
            f"{format_duration(now - status['updated'])} ago on {status.get('host')}"
        )
        if status.get("message"):
            lines.append(f"message: {status['message']}")
        # status.json is the current trainer's: one that has not saved yet names no checkpoint, the journal does
        saved = max((entry["step"] if entry["event"] == "start" else entry["steps"][1] for entry in journal), default=0)
        newest = status.get("newest_checkpoint") or (f"{STATE_DIR}/{state_dir_name(saved)}" if saved else "-")
        lines.append(f"newest checkpoint: {newest}; newest sample grid: {status.get('newest_grid') or '-'}")
    lines += [
        f"  attempt {entry['attempt']} {entry['call_id']}: steps {entry['steps'][0]}-{entry['steps'][1]}, "
        f"{entry['outcome']}"
        for entry in journal
        if entry["event"] == "end"
    ]
    return lines


if __name__ == "__main__":
    record_exit_main(sys.argv[1:])
