"""One writer per run folder: a lock file that names its holder, taken before anything in the folder is written.

`<run>/.lock` holds JSON {owner, host, pid, started, heartbeat, token}. A second trainer on the same run folder
stops with a message naming the holder, instead of deleting the first one's checkpoints and mixing its own
into them. A lock is stale, and taken over, when

- its process is gone (same machine: the pid no longer exists — "machine" is host name, boot and pid namespace,
  so two containers that share a host name never judge each other's pids), or
- its heartbeat is older than `stale_after_s` (any host; the holder refreshes it every `stale_after_s / 8`),
  which is how a lock left by a killed container or node on a shared file system expires.

A holder with the same non-empty `owner` is taken over at once: launchers that run one logical run as a chain
of attempts (modal_app.py: retries and continuations, never two at a time) give every attempt the same owner
through the TINY_CATS_RUN_OWNER environment variable. A plain local run has no owner and only ever takes over
a stale lock.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from scripts.lib.cli import UserError

LOCK_NAME = ".lock"
OWNER_ENV = "TINY_CATS_RUN_OWNER"
STALE_AFTER_ENV = "TINY_CATS_LOCK_STALE_S"
# Long enough that a busy machine never misses a heartbeat by that much, short enough that a crashed
# container's run can be continued within minutes.
DEFAULT_STALE_AFTER_S = 600.0
# A lock file that cannot be read (its writer died between creating and filling it) counts as stale this soon.
UNREADABLE_STALE_AFTER_S = 5.0


def machine_identity() -> str:
    """Host name, kernel boot and pid namespace: where a pid means the same process as here."""

    def read(path: str) -> str:
        try:
            return os.readlink(path) if os.path.islink(path) else Path(path).read_text().strip()
        except OSError:
            return "?"

    return f"{socket.gethostname()}|{read('/proc/sys/kernel/random/boot_id')}|{read('/proc/self/ns/pid')}"


@dataclass
class LockHolder:
    owner: str
    host: str
    pid: int
    started: float
    heartbeat: float
    token: str
    machine: str = ""  # machine_identity() of the holder; empty in locks that did not record it

    def describe(self, now: float | None = None) -> str:
        age = (now or time.time()) - self.heartbeat
        since = datetime.fromtimestamp(self.started, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        who = f" (run owner {self.owner})" if self.owner else ""
        return f"pid {self.pid} on {self.host}{who}, since {since}, last heartbeat {age:.0f} s ago"


def _read_holder(path: Path) -> LockHolder | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return LockHolder(
            owner=str(data["owner"]),
            host=str(data["host"]),
            pid=int(data["pid"]),
            started=float(data["started"]),
            heartbeat=float(data["heartbeat"]),
            token=str(data["token"]),
            machine=str(data.get("machine", "")),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, it is just someone else's
        return True
    return True


class RunLock:
    """The lock of one run folder; `acquire()` before writing into it, `release()` when done (or use `with`)."""

    def __init__(self, run_dir: str | Path, owner: str | None = None, stale_after_s: float | None = None):
        self.path = Path(run_dir) / LOCK_NAME
        self.owner = owner if owner is not None else os.environ.get(OWNER_ENV, "")
        self.stale_after_s = float(
            stale_after_s if stale_after_s is not None else os.environ.get(STALE_AFTER_ENV, DEFAULT_STALE_AFTER_S)
        )
        self.token = uuid.uuid4().hex
        self.lost_to: LockHolder | None = None  # set when another writer took the lock away from us
        self._held = False
        self._stop = threading.Event()
        self._heartbeat_thread: threading.Thread | None = None

    # --------------------------------------------------------------------------------------------------
    def _mine(self, started: float | None = None) -> LockHolder:
        now = time.time()
        return LockHolder(
            owner=self.owner,
            host=socket.gethostname(),
            pid=os.getpid(),
            started=started or now,
            heartbeat=now,
            token=self.token,
            machine=machine_identity(),
        )

    def _write_new(self) -> bool:
        """Create the lock file if there is none (atomic: O_EXCL); False when one exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(asdict(self._mine())))
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def is_stale(self, holder: LockHolder | None, now: float | None = None) -> bool:
        now = now or time.time()
        if holder is None:
            try:
                return now - self.path.stat().st_mtime > UNREADABLE_STALE_AFTER_S
            except FileNotFoundError:
                return True
        if self.owner and holder.owner == self.owner:
            return True  # an earlier attempt of this very run
        if holder.machine == machine_identity() and not _process_exists(holder.pid):
            return True
        return now - holder.heartbeat > self.stale_after_s

    def _take_over(self, judged: LockHolder | None) -> bool:
        """Move the judged-stale lock aside and create ours; False if someone else got there first."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return self._write_new()
        moved = _read_holder(aside)
        if judged is not None and (moved is None or moved.token != judged.token):
            # Between our look and the rename, another process replaced the stale lock with a live one: put it
            # back (unless yet another lock appeared meanwhile) and give way.
            try:
                os.link(aside, self.path)
            except FileExistsError:
                pass
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return self._write_new()

    def acquire(self) -> None:
        """Take the lock or raise a UserError that names the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(5):
            if self._write_new():
                break
            holder = _read_holder(self.path)
            if not self.is_stale(holder):
                who = holder.describe() if holder else "its lock file is being written right now"
                raise UserError(
                    f"run folder {self.path.parent} is in use by another trainer ({who}) — "
                    "wait for it to finish or stop it, or use another --run-name / --output-dir; "
                    f"a lock whose holder is gone expires after {self.stale_after_s:.0f} s"
                )
            if self._take_over(holder):
                break
        else:
            raise UserError(
                f"could not take the lock {self.path}: other processes keep taking it — is the same run "
                "being started repeatedly?"
            )
        self._held = True
        self._stop.clear()
        self._heartbeat_thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._heartbeat_thread.start()

    # --------------------------------------------------------------------------------------------------
    def heartbeat(self) -> bool:
        """Refresh our heartbeat; False (and `lost_to` set) when the lock is no longer ours."""
        holder = _read_holder(self.path)
        if holder is None or holder.token != self.token:
            self.lost_to = holder
            return False
        tmp = self.path.with_name(f"{LOCK_NAME}.{self.token}.tmp")
        tmp.write_text(json.dumps(asdict(self._mine(started=holder.started))))
        os.replace(tmp, self.path)
        return True

    def _beat(self) -> None:
        while not self._stop.wait(self.stale_after_s / 8):
            try:
                if not self.heartbeat():
                    return
            except OSError:  # a full or flaky disk: the next beat tries again
                continue

    def check_held(self) -> None:
        """Raise a UserError if another writer took the run over (so this one must not write any more)."""
        if self.lost_to is not None or (self._held and not self.heartbeat()):
            holder = self.lost_to.describe() if self.lost_to else "the lock file was removed"
            raise UserError(
                f"lost the lock of {self.path.parent} ({holder}) — another trainer took this run over "
                "after this one looked stale; stopping without writing anything more"
            )

    def release(self) -> None:
        if not self._held:
            return
        self._stop.set()
        if self._heartbeat_thread is not None:
            self._heartbeat_thread.join()
        holder = _read_holder(self.path)
        if holder is not None and holder.token == self.token:
            self.path.unlink(missing_ok=True)
        self._held = False

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()


def read_lock_holder(run_dir: str | Path) -> LockHolder | None:
    """Who holds the lock of a run folder (None: nobody, or an unreadable lock file)."""
    return _read_holder(Path(run_dir) / LOCK_NAME)
