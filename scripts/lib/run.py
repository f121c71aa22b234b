"""A training run: its folder, lock, log, status, resume, saves and stops, shared by both trainers."""

from __future__ import annotations

import dataclasses
import errno
import json
import logging
import math
import os
import platform
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import broadcast_object_list, gather_object
from torch import nn

from scripts.lib.checkpoints import (
    COMPLETE_MARKER,
    find_resume_state,
    flatten_state,
    list_complete_states,
    non_finite_names,
    load_training_state,
    prune_states,
    remove_unfinished_writes,
    save_training_state,
    state_dir_name,
)
from scripts.lib.cli import LOGGER_NAME, EXIT_SIGNAL_BASE, EXIT_TIME_LIMIT, UserError, resolve_device_type
from scripts.lib.data import ImageCache, load_or_build_cache, scan_image_folder

# ====================================================================================================
# Opening a training run: what both trainers do before their first step, in one place and one order.
# ====================================================================================================


STATE_DIR = "state"


# Writing fails for these reasons without anything being wrong with the run itself: say so in one line.
WRITE_ERRNOS = {
    errno.ENOSPC: "the disk is full",
    errno.EDQUOT: "the disk quota is used up",
    errno.EROFS: "the file system is read-only",
    errno.EACCES: "permission denied",
    errno.EPERM: "permission denied",
}


@dataclass
class RunSpec:
    """How a trainer's run differs from the other's."""

    kind: str  # "dit" or "classifier": names the tracker project and the status
    validate: Callable[[Any, int], None]  # the trainer's validate_config(cfg, num_processes)
    min_classes: int = 1
    outputs: list[Path] = field(default_factory=list)  # files written outside the run folder
    accumulation: int = 1  # --gradient-accumulation-steps
    log_with: str | None = None  # an Accelerate tracker


@dataclass
class Run:
    """An open run: where it writes, what it logs to, what it resumes from, and the data it trains on."""

    cfg: Any
    accelerator: Any
    run_dir: Path
    logger: logging.Logger
    status: StatusFile
    metrics: MetricsWriter
    cache: ImageCache
    resume_from: Path | None
    lock: RunLock
    keep_states: int
    tracking: bool
    on_checkpoint: Callable[[Path], None] | None = None

    @property
    def log(self) -> logging.Logger:
        return self.logger

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    @property
    def state_root(self) -> Path:
        return self.run_dir / STATE_DIR

    def load_resume_state(self) -> tuple[int, dict[str, Any]] | None:
        """(step, state) of the checkpoint this run continues, or None for a fresh start."""
        if self.resume_from is None:
            return None
        return load_training_state(self.resume_from)

    def begin(self, start_step: int, total_steps: int, resume_point: str) -> None:
        """Training starts: record the config (only now, once every check has passed) and say where from.

        `resume_point` completes "resuming ...", e.g. "from step 400" or "after epoch 3".
        """
        if self.is_main:
            write_config(self.run_dir, self.cfg)
        if self.resume_from is None:
            self.logger.info("starting fresh in %s", self.run_dir)
        else:
            self.logger.info("resuming %s (%s)", resume_point, self.resume_from)
        grids = sorted((self.run_dir / "samples").glob("step_*.png"))
        newest_grid = str(grids[-1].relative_to(self.run_dir)) if grids else None
        states = list_complete_states(self.state_root)
        newest_state = f"{STATE_DIR}/{states[-1][1].name}" if states else None
        self.status.update(
            state="training",
            step=start_step,
            steps=total_steps,
            newest_checkpoint=newest_state,
            newest_grid=newest_grid,
        )

    def save_state(self, step: int, state: dict[str, Any]) -> float:
        """Save a complete training state (main process), keep the newest ones; returns the seconds it took.

        Refuses to write a state holding NaN/inf, so the newest checkpoint is always one to resume from.
        """
        started = time.monotonic()
        if self.is_main:
            self.lock.check_held()
            tensors, _ = flatten_state(state)
            broken = non_finite_names(tensors)
            if broken:
                raise UserError(
                    f"not saving step {step}: {len(broken)} tensors hold NaN/inf (e.g. "
                    f"{', '.join(broken[:3])}) — lower --lr or use --mixed-precision no; the last "
                    "complete checkpoint is kept"
                )
            folder = save_training_state(self.state_root, step, state)
            prune_states(self.state_root, self.keep_states)
            self.logger.info("saved training state %s", folder)
            self._warn_if_disk_nearly_full(folder)
            self.status.update(newest_checkpoint=f"{STATE_DIR}/{folder.name}")
            if self.on_checkpoint is not None:
                self.on_checkpoint(folder)
        self.accelerator.wait_for_everyone()
        return time.monotonic() - started

    def _warn_if_disk_nearly_full(self, folder: Path) -> None:
        size = sum(file.stat().st_size for file in folder.iterdir())
        free = shutil.disk_usage(folder).free
        if free < 2 * size:
            self.logger.warning(
                "only %.1f GB free next to %s, and a checkpoint takes %.1f GB: free some space "
                "before the next save fails",
                free / 1e9,
                self.state_root,
                size / 1e9,
            )

    def log_metrics(self, step: int, eta_s: float | None, **metrics: Any) -> None:
        """One metrics.jsonl row (and tracker entry), and the status brought up to date."""
        self.metrics.write(step=step, **metrics)
        if self.tracking:
            self.accelerator.log(metrics, step=step)
        self.status.update(step=step, img_per_s=metrics.get("img_per_s"), eta_s=eta_s)


# ---------------------------------------------------------------------------------------------------------
# Checks before anything is written
# ---------------------------------------------------------------------------------------------------------
def common_problems(data_dir: str | None, batch_size: int, num_processes: int, resume: str) -> list[str]:
    """The flag checks both trainers make alike: data folder given, batch split over processes, --resume.

    --batch-size is the global batch of ONE forward pass (gradient accumulation multiplies it), so it only
    has to split evenly across the processes.
    """
    problems = []
    if not data_dir:
        problems.append("DATA_DIR is required (an image folder DATA_DIR/<class>/*.jpg)")
    if batch_size >= 1 and batch_size % num_processes:
        problems.append(
            f"--batch-size {batch_size} does not split evenly over {num_processes} processes; "
            f"use a multiple of {num_processes}"
        )
    if resume not in ("auto", "never"):
        folder, example = Path(resume), f"<run>/{STATE_DIR}/{state_dir_name(10000)}"
        if not folder.is_dir():
            problems.append(f"--resume {resume}: no such state folder (use auto, never, or a folder like {example})")
        elif not (folder / COMPLETE_MARKER).is_file():
            problems.append(
                f"--resume {resume} is not a complete training-state folder (no {COMPLETE_MARKER} marker) "
                f"— pass auto, never, or a folder like {example}"
            )
    return problems


def positive_problems(cfg: Any, *names: str) -> list[str]:
    """`--flag must be positive` for each named config field below 1."""
    values = {name: getattr(cfg, name) for name in names}
    return [f"--{name.replace('_', '-')} must be positive (got {value})" for name, value in values.items() if value < 1]


def unwritable_reason(path: Path) -> str | None:
    """Why nothing can be created at `path` (a folder, or a file's folder), or None when it can."""
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        return f"{existing} is a file, not a folder"
    probe = existing / f".tiny-cats-write-probe-{os.getpid()}"
    try:
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as error:
        return f"cannot write in {existing} ({error.strerror})"
    return None


def _start_problems(cfg: Any, spec: RunSpec, run_dir: Path, num_processes: int) -> str | None:
    try:
        spec.validate(cfg, num_processes)
        listing = scan_image_folder(cfg.data_dir)
    except UserError as error:
        return str(error)
    if len(listing.class_names) < spec.min_classes:
        return (
            f"{cfg.data_dir} has {len(listing.class_names)} class folder(s) ({', '.join(listing.class_names)}); "
            f"a {spec.kind} needs at least {spec.min_classes} — a one-class classifier predicts that class "
            "for anything"
        )
    for path in [run_dir, *(output.parent for output in spec.outputs)]:
        reason = unwritable_reason(path)
        if reason:
            return f"cannot write the run's outputs: {reason} — choose another --output-dir/--output or fix it"
    return None


def _agree(accelerator, problem: str | None) -> None:
    """Raise the first process's problem on every process, so no rank goes on alone and hangs."""
    problems = gather_object([problem]) if accelerator.num_processes > 1 else [problem]
    first = next((p for p in problems if p), None)
    if first:
        raise UserError(first)


def _on_main_for_all(accelerator, fn: Callable[[], Any]) -> Any:
    """fn() on the main process; its result, or its UserError, handed to every process."""
    outcome: list[Any] = [None]
    if accelerator.is_main_process:
        try:
            outcome = [("ok", fn())]
        except UserError as error:
            outcome = [("error", str(error))]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome, from_process=0)
    kind, value = outcome[0]
    if kind == "error":
        raise UserError(value)
    return value


def _resume_choice(cfg: Any, state_root: Path, accelerator) -> Path | None:
    """The main process's choice of checkpoint, for every process.

    Each process looks at its own file system; on several machines without a shared --output-dir they
    would silently disagree (some resume, some start fresh) and diverge or hang.
    """
    chosen = _on_main_for_all(accelerator, lambda: find_resume_state(cfg.resume, state_root))
    chosen = None if chosen is None else Path(chosen)
    missing = chosen is not None and not (chosen / COMPLETE_MARKER).is_file()
    _agree(
        accelerator,
        f"process {accelerator.process_index} cannot see {chosen}, the checkpoint the main process "
        "resumes from — on several machines --output-dir must be a folder they all share"
        if missing
        else None,
    )
    return chosen


# ---------------------------------------------------------------------------------------------------------
# Failures inside the run
# ---------------------------------------------------------------------------------------------------------
def as_user_error(error: BaseException) -> UserError | None:
    """The one-line advice for a failure a user can fix (CUDA OOM, CUDA errors, a full or read-only disk)."""
    if isinstance(error, UserError):
        return error
    if isinstance(error, OSError) and error.errno in WRITE_ERRNOS:
        where = f" {error.filename}" if error.filename else ""
        return UserError(
            f"cannot write{where}: {WRITE_ERRNOS[error.errno]} — free space or fix the permissions, "
            "then run the same command again to continue from the last complete checkpoint"
        )
    advice = describe_gpu_failure(error)
    return UserError(advice) if advice else None


@contextmanager
def open_run(
    cfg: Any, spec: RunSpec, on_checkpoint: Callable[[Path], None] | None = None, keep_states: int = 1
) -> Iterator[Run]:
    """Open (or continue) the run of `cfg` for a trainer; see the module docstring for the order."""
    run_dir = Path(cfg.output_dir) / cfg.run_name
    accelerator = make_accelerator(
        cfg.device,
        cfg.mixed_precision,
        spec.accumulation,
        log_with=spec.log_with,
        project_dir=cfg.tracker_dir or str(run_dir),
    )
    try:
        _agree(accelerator, _start_problems(cfg, spec, run_dir, accelerator.num_processes))
    except UserError as error:
        if accelerator.is_main_process:
            append_log_line(run_dir / "training.log", f"refused to start: {error}")
        raise
    lock = RunLock(run_dir)
    _on_main_for_all(accelerator, lock.acquire)
    logger = setup_logger(run_dir / "training.log", accelerator.is_main_process)
    status = StatusFile(run_dir / "status.json", enabled=accelerator.is_main_process, run=cfg.run_name, kind=spec.kind)
    try:
        yield _prepare_run(cfg, spec, accelerator, run_dir, logger, status, lock, keep_states, on_checkpoint)
        status.update(state="finished", message=None)
    except (SystemExit, KeyboardInterrupt) as stop:  # a signal or --time-limit (after saving), or a second Ctrl-C
        code = stop.code if isinstance(stop, SystemExit) else "interrupted"
        status.update(state="stopped", message=f"{code}; run the same command to continue")
        raise
    except BaseException as error:
        user_error = _record_failure(error, logger, status)
        if user_error is not None and user_error is not error:
            raise user_error from error
        raise
    finally:
        if spec.log_with:
            accelerator.end_training()
        if accelerator.is_main_process:
            lock.release()


def _prepare_run(
    cfg, spec: RunSpec, accelerator, run_dir: Path, logger, status, lock, keep_states, on_checkpoint
) -> Run:
    """Steps 4-6 of the module docstring, once the lock is held: log header, resume choice, leftovers, cache."""
    log_run_header(logger, cfg, str(accelerator.device), accelerator.mixed_precision, accelerator.num_processes)
    warning = precision_warning(accelerator.mixed_precision, accelerator.device.type)
    if warning:
        logger.warning(warning)
    resume_from = _resume_choice(cfg, run_dir / STATE_DIR, accelerator)
    if accelerator.is_main_process and (removed := remove_unfinished_writes(run_dir / STATE_DIR)):
        logger.info("removed %d unfinished checkpoint write(s) left by a killed run", removed)
    with accelerator.local_main_process_first():  # one process per machine builds the cache
        cache = load_or_build_cache(
            cfg.data_dir, cfg.image_size, cfg.cache_dir or None, log=logger, show_progress=accelerator.is_main_process
        )
    classes = ", ".join(cache.class_names)
    logger.info("data: %d images, %d classes (%s) from %s", len(cache), cache.num_classes, classes, cfg.data_dir)
    if spec.log_with:
        tracked = {key: value for key, value in config_dict(cfg).items() if value is not None}
        accelerator.init_trackers(f"tiny-cats-{spec.kind}", config=tracked)
    metrics = MetricsWriter(run_dir / "metrics.jsonl", enabled=accelerator.is_main_process)
    tracking = spec.log_with is not None
    return Run(
        cfg,
        accelerator,
        run_dir,
        logger,
        status,
        metrics,
        cache,
        resume_from,
        lock,
        keep_states,
        tracking,
        on_checkpoint,
    )


def _record_failure(error: BaseException, logger: logging.Logger, status: StatusFile) -> UserError | None:
    """Log a failure (one line for a user's, the traceback for a crash), mark the status; the user's error, if any."""
    user_error = as_user_error(error)
    message = str(user_error) if user_error else f"{type(error).__name__}: {error}"
    if user_error:
        logger.error("error: %s", message)
    else:
        logger.exception("crashed")
    status.update(state="failed", message=message)
    return user_error


# ====================================================================================================
# One writer per run folder: a lock file that names its holder, taken before anything in the folder is written.
# ====================================================================================================


LOCK_NAME = ".lock"


OWNER_ENV = "TINY_CATS_RUN_OWNER"


STALE_AFTER_ENV = "TINY_CATS_LOCK_STALE_S"


# Long enough that a busy machine never misses a heartbeat by that much, short enough that a crashed
# container's run can be continued within minutes.
DEFAULT_STALE_AFTER_S = 600.0


# A lock file that cannot be read (its writer died between creating and filling it) counts as stale this soon.
UNREADABLE_STALE_AFTER_S = 5.0


def stale_after_s() -> float:
    """How long a lock or lease may go without a heartbeat before it counts as abandoned (one rule for both)."""
    return float(os.environ.get(STALE_AFTER_ENV, DEFAULT_STALE_AFTER_S))


def heartbeat_is_stale(heartbeat: float, now: float | None = None) -> bool:
    return (now or time.time()) - heartbeat > stale_after_s()


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


# ====================================================================================================
# Run directories and logging: `checkpoints/<run-name>/` with config.json, training.log, metrics.jsonl and
# ====================================================================================================


_FORMAT = "%(asctime)s %(levelname)s %(message)s"


_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def default_run_name(prefix: str) -> str:
    """A fresh, sortable run name such as `dit-20261128-213012`."""
    return f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


class AppendingFileHandler(logging.Handler):
    """Appends each record and closes the file again: a file kept open on a Modal volume makes its commits fail."""

    def __init__(self, path: Path):
        super().__init__()
        self.path = path

    def emit(self, record: logging.LogRecord) -> None:
        try:
            with open(self.path, "a", encoding="utf-8") as handle:
                handle.write(self.format(record) + "\n")
        except OSError:
            self.handleError(record)


def setup_logger(log_file: Path | None, is_main: bool = True) -> logging.Logger:
    """The project logger: timestamps to the console (main process) and to `log_file` (appended)."""
    logger = logging.getLogger(LOGGER_NAME)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):  # a second run in the same process (tests) must not log twice
        handler.close()
        logger.removeHandler(handler)
    formatter = logging.Formatter(_FORMAT, _DATE_FORMAT)
    console = logging.StreamHandler(sys.stdout)
    console.setFormatter(formatter)
    console.setLevel(logging.INFO if is_main else logging.WARNING)
    logger.addHandler(console)
    if log_file is not None and is_main:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        file_handler = AppendingFileHandler(log_file)
        file_handler.setFormatter(formatter)
        logger.addHandler(file_handler)
    return logger


def append_log_line(log_file: Path, message: str, level: str = "ERROR") -> None:
    """One line at the end of an EXISTING training.log, in the logger's format (for a start that was refused
    before the run was opened). Newlines are escaped, so the message stays one line."""
    if not log_file.is_file():
        return
    stamp = datetime.now().strftime(_DATE_FORMAT)
    flat = message.replace("\r", "\\r").replace("\n", "\\n")
    with open(log_file, "a", encoding="utf-8") as handle:
        handle.write(f"{stamp} {level} {flat}\n")


def git_commit() -> str:
    """The commit of the code being run, or 'unknown' outside a git checkout (e.g. in the Modal image)."""
    try:
        result = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).resolve().parent,
            timeout=5,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "unknown"
    return result.stdout.strip() or "unknown"


def environment_summary() -> dict[str, str]:
    """Versions that decide whether a run can be reproduced."""
    import accelerate
    import torch
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "accelerate": accelerate.__version__,
        "platform": platform.platform(),
        "git_commit": git_commit(),
    }


def config_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-able dict (paths become strings)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def log_run_header(logger: logging.Logger, cfg: Any, device: str, precision: str, num_processes: int) -> None:
    """The first lines of every training.log: versions, commit, device, precision and the full config."""
    env = environment_summary()
    logger.info("tiny-cats %s", " ".join(f"{key}={value}" for key, value in env.items()))
    logger.info("device=%s precision=%s processes=%d", device, precision, num_processes)
    logger.info("config %s", json.dumps(config_dict(cfg), sort_keys=True))


def write_config(run_dir: Path, cfg: Any) -> None:
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.json").write_text(json.dumps(config_dict(cfg), indent=2, sort_keys=True) + "\n")


class MetricsWriter:
    """Appends one JSON object per line to metrics.jsonl (main process only; elsewhere a no-op)."""

    def __init__(self, path: Path, enabled: bool = True):
        self.path = path
        self.enabled = enabled
        if enabled:
            path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, **metrics: Any) -> None:
        if not self.enabled:
            return
        record = {"time": round(time.time(), 3), **metrics}
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(tmp, path)


class StatusFile:
    """status.json: the run's state ("training", "finished", "stopped", "failed"), step, speed, ETA and newest
    outputs, rewritten atomically at every log step and save (main process only; elsewhere a no-op)."""

    def __init__(self, path: Path, enabled: bool = True, **fields: Any):
        self.path = path
        self.enabled = enabled
        self.fields: dict[str, Any] = {
            "state": "starting",
            "started": round(time.time(), 3),
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "message": None,
            **fields,
        }

    def update(self, **fields: Any) -> None:
        self.fields.update(fields)
        if self.enabled:
            _write_json_atomic(self.path, {**self.fields, "updated": round(time.time(), 3)})


def read_status(run_dir: Path) -> dict[str, Any] | None:
    """A run's status.json, or None when it has none (yet) or it cannot be read."""
    try:
        return json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return None


def format_duration(seconds: float) -> str:
    """`3h04m`, `12m05s`, `42s` — for ETA log lines."""
    seconds = max(0, int(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    if minutes:
        return f"{minutes}m{secs:02d}s"
    return f"{secs}s"


# ====================================================================================================
# Device, precision, compilation and the Accelerator both trainers run on, and GPU errors turned into advice.
# ====================================================================================================


PRECISIONS = ("auto", "no", "fp16", "bf16")


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX).

    Measured on 2-core machines of one kind: bf16 autocast trained the DiT 1.7x faster than fp32 with
    AVX512-BF16, and about 30x SLOWER on an AVX2-only one, where bf16 is emulated.
    """
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def resolve_mixed_precision(requested: str, device_type: str) -> str:
    """'auto': bf16 on Ampere and newer, fp16 (with loss scaling) on T4/Volta, bf16 on CPUs that compute it in
    hardware, full fp32 ('no') elsewhere."""
    if requested == "auto":
        if device_type == "cpu":
            return "bf16" if cpu_has_native_bf16() else "no"
        if device_type != "cuda":
            return "no"
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    if requested == "fp16" and device_type == "cpu":
        # Accelerate would silently train in fp32; say so instead of pretending.
        raise UserError("--mixed-precision fp16 needs a GPU; on CPU use --mixed-precision bf16 or no")
    return requested


def precision_warning(precision: str, device_type: str) -> str | None:
    """Why an explicitly chosen precision will run badly on this device (None when it is fine)."""
    if precision == "bf16" and device_type == "cpu" and not cpu_has_native_bf16():
        return (
            f"--mixed-precision bf16 on a CPU without AVX512-BF16/AMX ({torch.backends.cpu.get_cpu_capability()}): "
            "bf16 is emulated there and ran ~30x slower than fp32 — use --mixed-precision no (or auto)"
        )
    return None


def make_accelerator(
    device: str,
    mixed_precision: str,
    gradient_accumulation_steps: int = 1,
    log_with: str | None = None,
    project_dir: str | None = None,
) -> Accelerator:
    """One Accelerator for the whole run (DDP, mixed precision, gradient accumulation)."""
    device_type = resolve_device_type(device)
    precision = resolve_mixed_precision(mixed_precision, device_type)
    # TF32 matmuls are ~8x faster than fp32 on Ampere+ and accurate enough for training.
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    # Accelerate keeps the first run's precision process-wide and refuses another; a second run in the same
    # process (a notebook, tests, in-process Modal calls) may rightly ask for a different one.
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
        AcceleratorState._reset_state()
    return Accelerator(
        cpu=device_type == "cpu",
        mixed_precision=precision,
        gradient_accumulation_steps=gradient_accumulation_steps,
        log_with=log_with,
        project_dir=project_dir,
    )


def compile_wanted(choice: str, device: torch.device) -> bool:
    """--compile auto|on|off: auto compiles on CUDA GPUs only, where it pays (measured on an H200: 1.54x for S/2);
    on a CPU its warm-up takes minutes for ~1.1x."""
    if choice == "auto":
        return device.type == "cuda"
    return choice == "on"


def compile_with_fallback(model: nn.Module, warm_up: Callable[[nn.Module], None], logger: logging.Logger) -> nn.Module:
    """torch.compile `model` and call `warm_up(compiled)` once (a forward + backward of a real batch), so the
    compile time is spent and logged now, not inside the first timed step. Gradients the warm-up leaves are
    dropped, so training is unchanged. Any compiler failure: one warning, and the eager `model` is returned."""
    compiled = torch.compile(model)
    started = time.perf_counter()
    try:
        warm_up(compiled)
        synchronize(next(model.parameters()).device)
    except (UserError, torch.cuda.OutOfMemoryError):
        raise
    except Exception as error:  # noqa: BLE001 — whatever the compiler raises, eager training still works
        first_line = str(error).splitlines()[0] if str(error) else ""
        logger.warning("torch.compile failed (%s: %s); training eagerly instead", type(error).__name__, first_line)
        return model
    finally:
        model.zero_grad(set_to_none=True)
    logger.info("compiled the model in %.1f s (a warm-up step, not counted in img/s)", time.perf_counter() - started)
    return compiled


def describe_gpu_failure(error: BaseException) -> str | None:
    """The advice for CUDA out-of-memory (a user error: a retry fails the same way), else None."""
    text = str(error)
    if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
        return (
            "out of GPU memory — lower --batch-size (and raise --gradient-accumulation-steps to keep the "
            "effective batch), choose a smaller --model or --image-size, or use --mixed-precision bf16/fp16"
        )
    return None  # any other CUDA/cuDNN/NCCL error is a crash: a fresh process or GPU may not have it


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings measure it (a no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ====================================================================================================
# When a run stops early: a signal (preemption, Ctrl-C) or the wall-clock budget of --time-limit.
# ====================================================================================================


TIME_LIMIT = "time limit"


# Headroom kept below --time-limit besides the estimated save: log lines, the final grid, process exit.
TIME_LIMIT_MARGIN_S = 30.0


# A second Ctrl-C this soon after the first is the same keypress relayed again (torchrun's and accelerate's
# elastic agent forwards the terminal's SIGINT to workers that got it already), not a request to skip the save.
REPEATED_SIGINT_S = 2.0


class StopRequest:
    """Set by SIGTERM (preemption) or SIGINT (Ctrl-C); the trainer saves and exits at the next step boundary."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._first_sigint = 0.0

    def handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            if time.monotonic() - self._first_sigint > REPEATED_SIGINT_S:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the checkpoint
            return
        if signum == signal.SIGINT:
            self._first_sigint = time.monotonic()
        self.signum = signum


@contextmanager
def stop_on_signals() -> Iterator[StopRequest]:
    request = StopRequest()
    if threading.current_thread() is not threading.main_thread():  # handlers can only be set there
        yield request
        return
    previous = {sig: signal.signal(sig, request.handle) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        yield request
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


class TimeBudget:
    """--time-limit: stop (after saving) when the next scheduled save would no longer fit in the budget.

    Time per step is amortised over this attempt (grids and saves included), and a save is assumed to take as
    long as the last one did.
    """

    def __init__(self, limit_s: float | None, start_step: int):
        self.limit_s = limit_s
        self.started = time.monotonic()
        self.start_step = start_step
        self.last_save_s = 0.0

    def saved(self, seconds: float) -> None:
        self.last_save_s = seconds

    def exhausted(self, step: int, next_save: int) -> bool:
        if self.limit_s is None or step <= self.start_step:
            return False
        elapsed = time.monotonic() - self.started
        per_step = elapsed / (step - self.start_step)
        needed = (next_save - step) * per_step + self.last_save_s + TIME_LIMIT_MARGIN_S
        return elapsed + needed > self.limit_s


class StopAgreement:
    """Every rank's stop wish (signal, time limit) combined so that all ranks stop after the same step."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.several = accelerator.num_processes > 1
        self._pending: torch.Tensor | None = None
        # Filled in place each step: creating a device tensor from a Python number would wait for the GPU.
        self._wish = torch.zeros(2, device=accelerator.device)

    def reason(self, signum: int | None, over_time: bool) -> str | None:
        """The agreed reason to stop after this step (a signal name or TIME_LIMIT), or None to go on."""
        if not self.several:
            return _reason(signum, over_time)
        agreed = self._pending
        self._wish[0].fill_(float(signum or 0))
        self._wish[1].fill_(float(over_time))
        self._pending = self._wish.clone()
        # The largest signal number wins where ranks caught different ones, so all name the same reason.
        torch.distributed.all_reduce(self._pending, op=torch.distributed.ReduceOp.MAX)
        if agreed is None:
            return None
        signum_max, over_time_max = agreed.tolist()  # last step's value: its work is done, this one's is queued
        return _reason(int(signum_max) or None, over_time_max > 0)


def _reason(signum: int | None, over_time: bool) -> str | None:
    if signum:
        return signal.Signals(signum).name
    return TIME_LIMIT if over_time else None


def exit_status(reason: str) -> int:
    """The process exit status that tells a launcher why the run stopped (see scripts.lib.cli)."""
    if reason == TIME_LIMIT:
        return EXIT_TIME_LIMIT
    return EXIT_SIGNAL_BASE + signal.Signals[reason].value


# ====================================================================================================
# Between two log lines: the loss summed on the device and the wall time, turned into the logged figures.
# ====================================================================================================


def next_boundary(step: int, interval: int, last: int) -> int:
    """The first step after `step` that is a multiple of `interval`, or `last` if that comes first."""
    return min((step // interval + 1) * interval, last)


class MetricsWindow:
    """Loss and time of the steps since the last log line.

    The loss stays on the device until the window closes, so logging costs one GPU wait per log line, not one
    per step. The first step of an attempt (allocations, kernel selection) is timed apart and left out of img/s
    unless it is all the window holds.
    """

    def __init__(self, device: torch.device, start_step: int):
        self.device = device
        self.loss_sum = torch.zeros((), device=device)
        self.steps = 0
        self.started = time.perf_counter()
        self.first_step_s: float | None = None
        self.seconds_per_step = math.nan  # of the last closed window
        self.last_loss = math.nan

    def add(self, loss: torch.Tensor, first_of_attempt: bool = False) -> None:
        self.loss_sum += loss
        self.steps += 1
        if first_of_attempt:
            synchronize(self.device)  # once per attempt: the warm-up's real end
            self.first_step_s = time.perf_counter() - self.started
            self.started = time.perf_counter()

    def close(self, accelerator, images_per_step: int) -> dict[str, float]:
        """{"loss" (mean over the window and all processes), "img_per_s", "seconds_per_step"}; starts a new window."""
        loss = accelerator.reduce(self.loss_sum, reduction="mean").item() / self.steps  # waits for the device
        seconds, timed = time.perf_counter() - self.started, self.steps
        if self.first_step_s is not None:
            timed -= 1
            if timed == 0:  # only the warm-up step in this window: report it rather than nothing
                seconds, timed = self.first_step_s, 1
        self.seconds_per_step = seconds / timed
        self.last_loss = loss
        figures = {
            "loss": loss,
            "img_per_s": images_per_step / self.seconds_per_step,
            "seconds_per_step": self.seconds_per_step,
        }
        if self.device.type == "cuda":
            figures["memory_peak_mb"] = torch.cuda.max_memory_allocated(self.device) / 2**20
        self.loss_sum = torch.zeros((), device=self.device)
        self.steps, self.first_step_s, self.started = 0, None, time.perf_counter()
        return figures


# ====================================================================================================
# The learning rate as a pure function of the optimizer step, so a resumed run needs no scheduler state.
# ====================================================================================================


LR_SCHEDULES = ("constant", "cosine")


def learning_rate(step: int, peak: float, warmup: int, schedule: str = "constant", total_steps: int = 0) -> float:
    """LR of optimizer step `step` (0-based): a linear warmup to `peak` over `warmup` steps, then constant (as in
    DiT) or, with "cosine", peak * (1 + cos(pi * p)) / 2 where p = (step - warmup) / (total_steps - warmup) runs
    from 0 to 1 (and stays at 1 past the end).

    A decay is what a short run gains most from: the last steps average out the noise of a large LR.
    """
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    progress = (step - warmup) / max(1, total_steps - warmup)
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


# ====================================================================================================
# The non-finite guard: no NaN/inf loss, gradient or weight ever reaches a checkpoint.
# ====================================================================================================


# What went non-finite first, as FirstBadStep records it.
PROBLEMS = {1: "loss", 2: "gradient norm", 3: "weights (after the update)"}


def apply_update_only_if_finite(optimizer, loss: torch.Tensor, grad_norm: torch.Tensor) -> torch.Tensor:
    """Make the coming `optimizer.step()` a no-op unless loss and gradient norm are finite.

    Returns a device int: 0 fine, 1 the loss, 2 the gradient norm was not finite (see PROBLEMS).

    `optimizer` may be Accelerate's wrapper; the flag goes to the torch optimizer inside it. An optimizer that
    cannot skip on the device (not fused, or driven by a gradient scaler that sets the flag itself) is left as
    it is: the weights check after the step still catches what it lets through.
    """
    loss_ok, grad_ok = torch.isfinite(loss), torch.isfinite(grad_norm)
    inner = getattr(optimizer, "optimizer", optimizer)
    if inner.defaults.get("fused") and getattr(optimizer, "scaler", None) is None:
        inner.found_inf = (~(loss_ok & grad_ok)).float()
    return torch.where(loss_ok, torch.where(grad_ok, 0, 2), 1)


def verdict_after_update(verdict: torch.Tensor, weights: Iterable[torch.Tensor]) -> torch.Tensor:
    """The step's verdict, with 3 (PROBLEMS) when it was fine so far but left the weights non-finite."""
    return torch.where((verdict == 0) & ~all_finite(weights), 3, verdict)


def all_finite(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """One device bool: every element of every tensor is finite (one multi-tensor norm pass, no sync).

    A norm overflows to inf for values near the float range's end too: such weights count as broken.
    """
    floats = [t.detach() for t in tensors if t.is_floating_point()]
    if not floats:
        return torch.ones((), dtype=torch.bool)
    return torch.isfinite(torch.stack(torch._foreach_norm(floats)).float()).all()


class FirstBadStep:
    """The first step whose loss, gradient or updated weights were not finite, and which, kept on the device."""

    def __init__(self, device: torch.device):
        self._step = torch.full((), -1, dtype=torch.int64, device=device)
        self._problem = torch.zeros((), dtype=torch.int64, device=device)

    def record(self, step: int, verdict: torch.Tensor) -> None:
        first = (self._step < 0) & (verdict != 0)
        self._step = torch.where(first, step, self._step)
        self._problem = torch.where(first, verdict, self._problem)

    def first(self) -> tuple[int, str] | None:
        """(step, what went non-finite), or None when all were fine (waits for the device: boundaries only)."""
        step, problem = torch.stack([self._step, self._problem]).tolist()
        return None if step < 0 else (step, PROBLEMS[problem])
