"""Opening a training run: what both trainers do before their first step, in one place and one order.

    with open_run(cfg, RunSpec(kind="dit", validate=validate_config), on_checkpoint) as run:
        ...build the model, resume, train...

1. Device and precision (one Accelerator); a precision the device runs badly is warned about.
2. Every check that can fail without writing anything: the trainer's own flag checks, the data folder's layout
   and number of classes, the --resume folder, and that the output locations are writable. So a failed start
   changes nothing of an existing run; it only appends its error line to that run's training.log.
3. The run lock (scripts.lib.run_lock): one trainer at a time writes a run folder.
4. training.log (with versions, device and config), status.json, metrics.jsonl.
5. The checkpoint to resume from, chosen by the main process for all; leftovers of killed saves removed.
6. The uint8 image cache (one build per machine).
Inside the `with` block, every error a user can cause ends as one line that is also in training.log (CUDA
out-of-memory and a full disk become advice), status.json says "failed", and the lock is released.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list, gather_object

from scripts.lib.checkpoints import (
    COMPLETE_MARKER,
    find_resume_state,
    flatten_state,
    list_complete_states,
    load_training_state,
    prune_states,
    remove_unfinished_writes,
    save_training_state,
    state_dir_name,
)
from scripts.lib.cli import UserError
from scripts.lib.guard import non_finite_names
from scripts.lib.images import ImageCache, load_or_build_cache, scan_image_folder
from scripts.lib.run_lock import RunLock
from scripts.lib.runlog import (
    MetricsWriter,
    StatusFile,
    append_log_line,
    config_dict,
    log_run_header,
    setup_logger,
    write_config,
)
from scripts.lib.runtime import describe_gpu_failure, make_accelerator, precision_warning

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
        cfg.device, cfg.mixed_precision, spec.accumulation, log_with=spec.log_with, project_dir=str(run_dir)
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
        cache = load_or_build_cache(cfg.data_dir, cfg.image_size, log=logger, show_progress=accelerator.is_main_process)
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
