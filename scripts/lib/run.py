"""A training run, the same for both trainers: open, resume, save, log, stop, finish.

    with open_run(cfg, RunSpec("dit", validate_config)) as run:
        step, saved = run.restore(TrainingState(model, optimizer, ema), architecture, schedule)  # 0, None: fresh
        run.begin(step, total_steps, "from step 400")
        ...  run.record(step, eta_s, **metrics); run.save(step, state.state_dict(...))
        run.write_weights(final_path, model, metadata)

A run lives in <output-dir>/<run-name>/: config.json, training.log, metrics.jsonl, status.json, .lock, state/.
Opening it: one Accelerator; every check that needs no writing (flags, data, an explicit --resume folder, writable
outputs that fit in memory), so a failed start changes nothing but a line in an existing training.log; the run lock;
the log; the checkpoint to resume, chosen by the main process for all; the image cache. Inside the `with` block a
user's error ends as one line, also in training.log, status.json says "failed", and the lock is released. Only the
main process writes files; the others wait where it saves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import importlib.util
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

from scripts.lib.checkpoints import TrainingState, find_resume_state, list_complete_states, load_training_state
from scripts.lib.checkpoints import prune_states, remove_unfinished_writes, save_model, save_training_state
from scripts.lib.cli import DEVICES, EXIT_SIGNAL_BASE, EXIT_TIME_LIMIT, LOGGER_NAME, UserError, cpu_threads_option
from scripts.lib.cli import name_problem, non_finite_flags, option, printable, resolve_device_type, write_atomic
from scripts.lib.cli import write_failure, write_json
from scripts.lib.data import AUGMENTATION_LEVELS, ImageCache, available_memory_bytes, load_or_build_cache
from scripts.lib.data import scan_image_folder

STATE_DIR = "state"
PRECISIONS = ("auto", "no", "fp16", "bf16")
REPORT_TO = ("none", "tensorboard", "wandb")
LR_SCHEDULES = ("constant", "cosine")
log = logging.getLogger(LOGGER_NAME)


@dataclass
class TrainerConfig:
    """The flags both trainers have; each trainer's config adds its own and may change a default."""

    data_dir: str | None = option(None, "image folder DATA_DIR/<class>/*.jpg", positional=True)
    batch_size: int = option(32, "GLOBAL batch per optimizer step, summed over all processes")
    lr: float = option(1e-4, "peak learning rate (AdamW), reached after the warmup")
    weight_decay: float = option(0.0, "AdamW weight decay")
    augmentation_level: str = option("full", "training augmentation", choices=AUGMENTATION_LEVELS)
    image_size: int = option(64, "training resolution (images are resized + centre-cropped once, then cached)")
    device: str = option("auto", "where to train", choices=DEVICES)
    mixed_precision: str = option("auto", "auto: bf16 where the GPU/CPU has it, fp16 on T4", choices=PRECISIONS)
    seed: int = option(0, "seed of the initial weights, the data order, augmentation and noise")
    run_name: str = option("run", "run folder under --output-dir; the same name resumes the same run")
    output_dir: str = option("checkpoints", "where run folders go")
    resume: str = option("auto", "auto: the run's newest checkpoint; never: fresh only; or a state folder")
    cache_dir: str = option("", "where the image cache goes (default: DATA_DIR/.tiny-cats-cache, else ~/.cache)")
    report_to: str = option("none", "also log to an Accelerate tracker (if installed)", choices=REPORT_TO)
    tracker_dir: str = option("", "where --report-to writes its files (default: the run folder)")
    cpu_threads: int = cpu_threads_option()


def common_problems(cfg: TrainerConfig, num_processes: int, min_image_size: int, max_image_size: int) -> list[str]:
    """The flag checks both trainers make alike. --batch-size is the global batch of ONE forward pass (gradient
    accumulation multiplies it), so it has to split evenly over the processes."""
    problems = non_finite_flags(cfg) + positive_problems(cfg, "batch_size")
    if not cfg.data_dir:
        problems.append("DATA_DIR is required (an image folder DATA_DIR/<class>/*.jpg)")
    if cfg.batch_size >= 1 and cfg.batch_size % num_processes:
        problems.append(
            f"--batch-size {cfg.batch_size} does not split evenly over {num_processes} processes; "
            f"use a multiple of {num_processes}"
        )
    if not cfg.lr > 0 or not cfg.weight_decay >= 0:
        problems.append(f"--lr must be positive and --weight-decay >= 0 (got {cfg.lr}, {cfg.weight_decay})")
    if not min_image_size <= cfg.image_size <= max_image_size:
        problems.append(f"--image-size must be from {min_image_size} to {max_image_size} (got {cfg.image_size})")
    if problem := name_problem(cfg.run_name):
        problems.append(f"--run-name {printable(cfg.run_name)!r} {problem}")
    if cfg.report_to != "none" and importlib.util.find_spec(cfg.report_to) is None:
        problems.append(f"--report-to {cfg.report_to}: the {cfg.report_to} package is not installed — pip install it")
    return problems


def positive_problems(cfg: Any, *names: str) -> list[str]:
    return [f"--{n.replace('_', '-')} must be positive (got {getattr(cfg, n)})" for n in names if getattr(cfg, n) < 1]


def learning_rate(step: int, peak: float, warmup: int, schedule: str = "constant", total_steps: int = 0) -> float:
    """The LR of optimizer step `step` (0-based), a pure function of the step so a resume needs no scheduler state:
    linear warmup to `peak`, then constant (DiT) or cosine to 0 at `total_steps` (a short run gains most from it)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    if schedule == "constant":
        return peak
    return peak * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total_steps - warmup))))


# --- Device and precision ----------------------------------------------------------------------------------------
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 autocast is faster than fp32 there, and many times slower where it is emulated."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def resolve_mixed_precision(requested: str, device_type: str) -> str:
    """auto: bf16 on Ampere+ and on CPUs that compute it in hardware, fp16 (loss scaling) on T4/Volta, else fp32."""
    if requested == "fp16" and device_type == "cpu":  # Accelerate would silently train in fp32
        raise UserError("--mixed-precision fp16 needs a GPU; on CPU use --mixed-precision bf16 or no")
    if requested != "auto":
        return requested
    if device_type == "cpu":
        return "bf16" if cpu_has_native_bf16() else "no"
    if device_type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported(including_emulation=False) else "fp16"
    return "no"


def allow_tf32() -> None:
    """TF32 matmuls and convolutions on CUDA: far faster on Ampere+, accurate enough for training."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True


def make_accelerator(device: str, mixed_precision: str, accumulation: int = 1, **kwargs: Any) -> Accelerator:
    """One Accelerator for the whole run (DDP, mixed precision, gradient accumulation)."""
    device_type = resolve_device_type(device)
    precision = resolve_mixed_precision(mixed_precision, device_type)
    allow_tf32()
    # Accelerate keeps the first run's precision process-wide and refuses another; a second run in one process
    # (tests, notebooks) may rightly ask for a different one.
    if AcceleratorState._shared_state and AcceleratorState().mixed_precision != precision:
        AcceleratorState._reset_state()
    return Accelerator(
        cpu=device_type == "cpu", mixed_precision=precision, gradient_accumulation_steps=accumulation, **kwargs
    )


def precision_warning(precision: str, device_type: str) -> str | None:
    if precision == "bf16" and device_type == "cpu" and not cpu_has_native_bf16():
        capability = torch.backends.cpu.get_cpu_capability()
        return (
            f"--mixed-precision bf16 on a CPU without AVX512-BF16/AMX ({capability}) is emulated, ~30x slower than "
            "fp32 — use --mixed-precision no (or auto)"
        )
    return None


def describe_gpu_failure(error: BaseException) -> str | None:
    """The advice for CUDA out-of-memory (a user error: a retry fails the same way), else None."""
    if isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower():
        return (
            "out of GPU memory — lower --batch-size (and raise --gradient-accumulation-steps to keep the effective "
            "batch), choose a smaller --model or --image-size, or use --mixed-precision bf16/fp16"
        )
    return None  # any other CUDA/cuDNN/NCCL error is a crash: a fresh process or GPU may not have it


def synchronize(device: torch.device) -> None:
    """Wait for queued GPU work, so that wall-clock timings measure it (a no-op elsewhere)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------------
# One writer per run folder: <run>/.lock names its holder (JSON {owner, host, machine, pid, started, heartbeat,
# token}). It is stale, and taken over, when its process is gone (same machine: host, boot and pid namespace, so two
# containers sharing a host name never judge each other's pids) or its heartbeat is older than stale_after_s() (any
# host; the holder beats every 1/8 of that). A holder with the same non-empty owner (TINY_CATS_RUN_OWNER: attempts
# of one Modal run) is taken over at once. A lock file still being written counts as stale after 5 s.
# ---------------------------------------------------------------------------------------------------------
LOCK_NAME, OWNER_ENV, STALE_AFTER_ENV = ".lock", "TINY_CATS_RUN_OWNER", "TINY_CATS_LOCK_STALE_S"
DEFAULT_STALE_AFTER_S, UNREADABLE_STALE_AFTER_S = 600.0, 5.0  # no busy machine misses a heartbeat by 10 minutes


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
    machine: str = ""

    def describe(self) -> str:
        since = datetime.fromtimestamp(self.started, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
        who = f" (run owner {self.owner})" if self.owner else ""
        age = time.time() - self.heartbeat
        return f"pid {self.pid} on {self.host}{who}, since {since}, last heartbeat {age:.0f} s ago"


def read_lock_holder(run_dir: str | Path) -> LockHolder | None:
    """Who holds the lock of a run folder (None: nobody, or an unreadable lock file)."""
    return _read_holder(Path(run_dir) / LOCK_NAME)


def _read_holder(path: Path) -> LockHolder | None:
    try:
        d = json.loads(path.read_text())
        return LockHolder(str(d["owner"]), str(d["host"]), int(d["pid"]), float(d["started"]),
                          float(d["heartbeat"]), str(d["token"]), str(d.get("machine", "")))  # fmt: skip
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None


class RunLock:
    """The lock of one run folder: `acquire()` before writing into it, `release()` when done."""

    def __init__(self, run_dir: str | Path, owner: str | None = None):
        self.path = Path(run_dir) / LOCK_NAME
        self.owner = owner if owner is not None else os.environ.get(OWNER_ENV, "")
        self.token, self.lost_to, self._held = uuid.uuid4().hex, None, False
        self._stop = threading.Event()

    def _mine(self, started: float | None = None) -> dict[str, Any]:
        now, host = time.time(), socket.gethostname()
        holder = LockHolder(self.owner, host, os.getpid(), started or now, now, self.token, machine_identity())
        return asdict(holder)

    def _create(self) -> bool:
        """Create the lock file if there is none (atomic: O_EXCL); False when one exists."""
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as handle:
            handle.write(json.dumps(self._mine()))
            handle.flush()
            os.fsync(handle.fileno())
        return True

    def is_stale(self, holder: LockHolder | None) -> bool:
        if holder is None:  # being written right now, or its writer died between create and write
            try:
                return time.time() - self.path.stat().st_mtime > UNREADABLE_STALE_AFTER_S
            except FileNotFoundError:
                return True
        gone = holder.machine == machine_identity() and not _process_exists(holder.pid)
        return bool(self.owner and holder.owner == self.owner) or gone or heartbeat_is_stale(holder.heartbeat)

    def _take_over(self, judged: LockHolder | None) -> bool:
        """Move the judged-stale lock aside and create ours; False if someone else got there first."""
        aside = self.path.with_name(f"{LOCK_NAME}.stale-{self.token}")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return self._create()
        moved = _read_holder(aside)
        if judged is not None and (moved is None or moved.token != judged.token):
            # Between our look and the rename another process replaced the stale lock with a live one: put it back.
            with contextlib.suppress(FileExistsError):
                os.link(aside, self.path)
            aside.unlink(missing_ok=True)
            return False
        aside.unlink(missing_ok=True)
        return self._create()

    def acquire(self) -> None:
        """Take the lock or raise a UserError that names the live holder."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_dir():
            raise UserError(f"{self.path} is a folder, not this kit's lock file — remove it and start again")
        for _ in range(5):
            if self._create():
                break
            holder = read_lock_holder(self.path.parent)
            if not self.is_stale(holder):
                who = holder.describe() if holder else "its lock file is being written right now"
                raise UserError(
                    f"run folder {self.path.parent} is in use by another trainer ({who}) — wait for it to finish or "
                    f"stop it, or use another --run-name / --output-dir; a lock whose holder is gone expires after "
                    f"{stale_after_s():.0f} s"
                )
            if self._take_over(holder):
                break
        else:
            raise UserError(f"could not take the lock {self.path}: other processes keep taking it")
        self._held = True
        threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True).start()

    def heartbeat(self) -> bool:
        """Refresh our heartbeat; False (and `lost_to` set) when the lock is no longer ours."""
        holder = read_lock_holder(self.path.parent)
        if holder is None or holder.token != self.token:
            self.lost_to = holder
            return False
        write_atomic(self.path, json.dumps(self._mine(started=holder.started)))
        return True

    def _beat(self) -> None:
        while not self._stop.wait(stale_after_s() / 8):
            try:
                if not self.heartbeat():
                    return
            except OSError:  # a full or flaky disk: the next beat tries again
                continue

    def check_held(self) -> None:
        """Raise if another writer took the run over (after this one looked stale): write nothing more."""
        if self.lost_to is not None or (self._held and not self.heartbeat()):
            holder = self.lost_to.describe() if self.lost_to else "the lock file was removed"
            raise UserError(f"lost the lock of {self.path.parent} ({holder}) — another trainer took this run over; "
                            "stopping without writing anything more")  # fmt: skip

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.release()

    def release(self) -> None:
        self._stop.set()
        holder = read_lock_holder(self.path.parent) if self._held else None
        if holder is not None and holder.token == self.token:
            self.path.unlink(missing_ok=True)
        self._held = False


def _process_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, it is just someone else's
        pass
    return True


# --- Logs and status ---------------------------------------------------------------------------------------------
_FORMAT, _DATE_FORMAT = "%(asctime)s %(levelname)s %(message)s", "%Y-%m-%d %H:%M:%S"


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
    """The kit's logger: timestamps to the console (main process: INFO, others: WARNING) and to `log_file`."""
    log.setLevel(logging.INFO)
    log.propagate = False
    for handler in list(log.handlers):  # a second run in the same process (tests) must not log twice
        log.removeHandler(handler)
    handlers: list[logging.Handler] = [logging.StreamHandler(sys.stdout)]
    handlers[0].setLevel(logging.INFO if is_main else logging.WARNING)
    if log_file is not None and is_main:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        handlers.append(AppendingFileHandler(log_file))
    for handler in handlers:
        handler.setFormatter(logging.Formatter(_FORMAT, _DATE_FORMAT))
        log.addHandler(handler)
    return log


def append_log_line(log_file: Path, message: str, level: str = "ERROR") -> None:
    """One line at the end of an EXISTING training.log (a start refused before the run was opened)."""
    if log_file.is_file():
        with open(log_file, "a", encoding="utf-8") as handle:
            handle.write(f"{datetime.now().strftime(_DATE_FORMAT)} {level} {printable(message)}\n")


def config_dict(cfg: Any) -> dict[str, Any]:
    """A dataclass config as a JSON-able dict (paths become strings)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg), default=str))


def default_run_name(prefix: str) -> str:
    """A fresh, sortable run name such as `dit-20261128-213012`."""
    return f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


def log_run_header(cfg: Any, accelerator: Accelerator) -> None:
    """The first lines of every training.log: what decides whether the run can be reproduced."""
    import accelerate
    import torchvision

    try:  # no commit in the Modal image, which has no .git
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent, check=False).stdout.strip()  # fmt: skip
    except (OSError, subprocess.TimeoutExpired):
        git = ""
    versions = dict(python=platform.python_version(), torch=torch.__version__, torchvision=torchvision.__version__,
                    accelerate=accelerate.__version__, platform=platform.platform(), git=git or "unknown")  # fmt: skip
    log.info("tiny-cats %s", " ".join(f"{key}={value}" for key, value in versions.items()))
    device, precision, processes = accelerator.device, accelerator.mixed_precision, accelerator.num_processes
    log.info("device=%s precision=%s processes=%d threads=%d", device, precision, processes, torch.get_num_threads())
    log.info("config %s", json.dumps(config_dict(cfg), sort_keys=True))


class StatusFile:
    """status.json: where the run stands (state: starting, training, finished, stopped, failed; step, speed, ETA,
    newest outputs, message), rewritten atomically at every log line and save, for people and launchers."""

    def __init__(self, path: Path, enabled: bool, **fields: Any):
        self.path, self.enabled = path, enabled
        self.fields = dict(state="starting", started=round(time.time(), 3), host=socket.gethostname(),
                           pid=os.getpid(), message=None, **fields)  # fmt: skip

    def update(self, **fields: Any) -> None:
        self.fields.update(fields)
        if self.enabled:
            write_atomic(self.path, json.dumps({**self.fields, "updated": round(time.time(), 3)}, indent=2) + "\n")


def format_duration(seconds: float) -> str:
    """`3h04m`, `12m05s`, `42s` — for ETA log lines."""
    hours, rest = divmod(max(0, int(seconds)), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


# --- Stopping early and the non-finite guard ---------------------------------------------------------------------
TIME_LIMIT = "time limit"
TIME_LIMIT_MARGIN_S = 30.0  # headroom below --time-limit besides the save: log lines, the final grid, exit
REPEATED_SIGINT_S = 2.0  # a second SIGINT this soon is the launcher relaying the same keypress, not a second Ctrl-C


class Stopper:
    """Why a run stops early: SIGTERM (preemption) or SIGINT (Ctrl-C), or --time-limit when the next scheduled save
    would not fit in it (time per step amortised over this attempt, a save as long as the last). Every rank's wish
    is all-reduced so that all stop after the same step; the reduced value is read one step late, which keeps the
    GPU queue full. The trainer then saves and exits with `exit_status(reason)`."""

    def __init__(self, accelerator: Accelerator, time_limit_s: float | None = None, start_step: int = 0):
        self.accelerator, self.limit_s, self.start_step = accelerator, time_limit_s, start_step
        self.signum: int | None = None
        self.started, self.last_save_s, self._first_sigint = time.monotonic(), 0.0, 0.0
        self._wish = torch.zeros(2, device=accelerator.device)  # filled in place: a new tensor would wait for the GPU
        self._pending: torch.Tensor | None = None

    def _handle(self, signum: int, _frame: Any) -> None:
        if signum == signal.SIGINT and self.signum == signal.SIGINT:
            if time.monotonic() - self._first_sigint > REPEATED_SIGINT_S:
                raise KeyboardInterrupt  # a second Ctrl-C: stop now, without waiting for the checkpoint
            return
        self._first_sigint = time.monotonic() if signum == signal.SIGINT else self._first_sigint
        self.signum = signum

    def __enter__(self) -> Stopper:
        self._previous = {}
        if threading.current_thread() is threading.main_thread():  # handlers can only be set there
            self._previous = {sig: signal.signal(sig, self._handle) for sig in (signal.SIGTERM, signal.SIGINT)}
        return self

    def __exit__(self, *exc_info: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def over_time(self, step: int, next_save: int) -> bool:
        if self.limit_s is None or step <= self.start_step:
            return False
        elapsed = time.monotonic() - self.started
        needed = (next_save - step) * elapsed / (step - self.start_step) + self.last_save_s + TIME_LIMIT_MARGIN_S
        return elapsed + needed > self.limit_s

    def reason(self, step: int, next_save: int, last_step: int) -> str | None:
        """The agreed reason to stop after `step` (a signal name or TIME_LIMIT), or None to go on."""
        over_time = step < last_step and self.over_time(step, next_save)  # at the last step finishing beats stopping
        name = lambda signum, late: signal.Signals(signum).name if signum else TIME_LIMIT if late else None  # noqa: E731
        if self.accelerator.num_processes == 1:
            return name(self.signum, over_time)
        agreed = self._pending
        self._wish[0].fill_(float(self.signum or 0))
        self._wish[1].fill_(float(over_time))
        self._pending = self._wish.clone()
        torch.distributed.all_reduce(self._pending, op=torch.distributed.ReduceOp.MAX)  # the largest signal wins
        return None if agreed is None else name(int(agreed[0].item()), agreed[1].item() > 0)


def exit_status(reason: str) -> int:
    """The exit status that tells a launcher why the run stopped (scripts.lib.cli documents them)."""
    return EXIT_TIME_LIMIT if reason == TIME_LIMIT else EXIT_SIGNAL_BASE + signal.Signals[reason].value


def adamw(model: torch.nn.Module, cfg: TrainerConfig) -> torch.optim.AdamW:
    """AdamW over `model`, fused where torch has the kernel: one kernel over all parameters, and one that can skip a
    non-finite step on the device (NonFiniteGuard)."""
    fused = next(model.parameters()).device.type in ("cuda", "cpu")
    return torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay, fused=fused)


class NonFiniteGuard:
    """No NaN/inf loss, gradient or weight ever reaches a checkpoint, and the GPU is never waited for to know it.

    `step()` replaces `optimizer.step()`: a step whose loss or gradient norm is not finite is not applied (the fused
    AdamW kernel skips it through its `found_inf` input, as for a gradient scaler), and whether the weights are still
    finite after it is recorded. The first bad step stays on the device until `check()` reads it at a log or save
    boundary and stops the run with the advice; checkpoints are also refused tensor by tensor when written.
    """

    WHAT = ("", "loss", "gradient norm", "weights (after the update)")

    def __init__(self, device: torch.device):
        self._first = torch.full((2,), -1, dtype=torch.int64, device=device)  # (step, index into WHAT)

    def step(self, optimizer, step: int, loss: torch.Tensor, grad_norm: torch.Tensor, parameters: Iterable) -> None:
        loss_ok, grad_ok = torch.isfinite(loss), torch.isfinite(grad_norm)
        inner = getattr(optimizer, "optimizer", optimizer)
        if inner.defaults.get("fused") and getattr(optimizer, "scaler", None) is None:
            inner.found_inf = (~(loss_ok & grad_ok)).float()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        floats = [p.detach() for p in parameters if p.is_floating_point()]
        weights_ok = torch.isfinite(torch.stack(torch._foreach_norm(floats)).float()).all()  # overflow counts too
        what = torch.where(~loss_ok, 1, torch.where(~grad_ok, 2, torch.where(~weights_ok, 3, 0)))
        first = (self._first[0] < 0) & (what != 0)
        self._first = torch.where(first, torch.stack([torch.full_like(what, step), what]), self._first)

    def check(self, advice: str) -> None:
        """Raise the advice if a step went non-finite (reads the device: boundaries only)."""
        step, what = self._first.tolist()
        if step >= 0:
            raise UserError(f"{self.WHAT[what]} became NaN/inf at step {step} — {advice}; nothing was saved after it, "
                            "the last complete checkpoint is kept")  # fmt: skip


# --- The run -----------------------------------------------------------------------------------------------------
@dataclass
class RunSpec:
    """How one trainer's run differs from the other's."""

    kind: str  # "dit" or "classifier": names the status and the tracker project
    validate: Callable[[Any, int], None]  # raises a UserError naming every bad flag, for N processes
    outputs: list[Path] = field(default_factory=list)  # files written outside the run folder
    min_classes: int = 1
    accumulation: int = 1  # forward passes per optimizer step
    keep_states: int = 1


@dataclass
class Run:
    """An open run: where it writes, what it logs to, what it resumes from, and the data it trains on."""

    cfg: Any
    spec: RunSpec
    accelerator: Accelerator
    run_dir: Path
    status: StatusFile
    lock: RunLock
    cache: ImageCache | None = None
    resumed: tuple[Path, int, dict[str, Any]] | None = None  # (folder, step, state) of the checkpoint continued
    on_checkpoint: Callable[[Path], None] | None = None
    log: logging.Logger = log
    begun: bool = False  # training started: a failure now is no failed start

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def device(self) -> torch.device:
        return self.accelerator.device

    def restore(self, state: TrainingState, architecture: dict[str, Any], schedule: dict[str, Any] | None = None):
        """Load the checkpoint this run continues into `state`, refused when it was trained as another model (and
        noted when its data order or LR schedule differ); returns (its step, its saved record), or (0, None)."""
        if self.resumed is None:
            return 0, None
        folder, step, saved = self.resumed
        recorded = saved.get("architecture")
        if not isinstance(recorded, dict) or not isinstance(saved.get("training_schedule", {}), dict):
            raise UserError(f"{folder}: its record of the setup is damaged — not a state this kit wrote; use another")
        differences = [
            f"{k} {recorded.get(k, '(none)')} -> {v}" for k, v in architecture.items() if recorded.get(k) != v
        ]
        if differences:
            raise UserError(f"{folder} was trained with a different setup ({'; '.join(differences)}) — use the same "
                            "flags and data to continue it, or a new --run-name")  # fmt: skip
        if schedule is not None:
            before = saved.get("training_schedule") or {}
            changed = [key for key in {**before, **schedule} if before.get(key) != schedule.get(key)]
            if changed:
                self.log.info("note: %s changed since the checkpoint; not an exact continuation", ", ".join(changed))
        state.load(saved, folder)
        return step, saved

    def begin(self, start_step: int, total_steps: int, resume_point: str) -> None:
        """Training starts: record the config (only now, once every check has passed) and say where from."""
        if self.is_main:
            write_json(self.run_dir / "config.json", config_dict(self.cfg), "config.json")
        self.begun = True
        if self.resumed is None:
            self.log.info("starting fresh in %s", self.run_dir)
        else:
            self.log.info("resuming %s (%s)", resume_point, self.resumed[0])
        grids = sorted((self.run_dir / "samples").glob("step_*.png"))
        states = list_complete_states(self.run_dir / STATE_DIR)
        self.status.update(
            state="training", step=start_step, steps=total_steps,
            newest_checkpoint=f"{STATE_DIR}/{states[-1][1].name}" if states else None,
            newest_grid=str(grids[-1].relative_to(self.run_dir)) if grids else None,
        )  # fmt: skip

    def record(self, step: int, eta_s: float | None, **metrics: Any) -> None:
        """One metrics.jsonl row (and tracker entry), and the status brought up to date."""
        if self.is_main:
            with open(self.run_dir / "metrics.jsonl", "a", encoding="utf-8") as handle:
                handle.write(json.dumps({"time": round(time.time(), 3), "step": step, **metrics}) + "\n")
        if self.cfg.report_to != "none":
            self.accelerator.log(metrics, step=step)
        self.status.update(step=step, img_per_s=metrics.get("img_per_s"), eta_s=eta_s)

    def save(self, step: int, state: dict[str, Any]) -> float:
        """Save a complete training state (main process; NaN/inf refused), keep the newest; the seconds it took."""
        started = time.monotonic()
        if self.is_main:
            self.lock.check_held()
            folder = save_training_state(self.run_dir / STATE_DIR, step, state)
            prune_states(self.run_dir / STATE_DIR, self.spec.keep_states)
            self.log.info("saved training state %s", folder)
            size, free = sum(f.stat().st_size for f in folder.iterdir()), shutil.disk_usage(folder).free
            if free < 2 * size:
                self.log.warning("only %.1f GB free next to %s, and a checkpoint takes %.1f GB: free some space "
                                 "before the next save fails", free / 1e9, folder.parent, size / 1e9)  # fmt: skip
            self.status.update(newest_checkpoint=f"{STATE_DIR}/{folder.name}")
            if self.on_checkpoint is not None:
                self.on_checkpoint(folder)
        self.accelerator.wait_for_everyone()
        return time.monotonic() - started

    def write_weights(self, path: Path, model: torch.nn.Module, metadata: dict[str, Any], copy_to: Path | None = None):
        """Final weights (main process; NaN/inf refused), and a copy of them at `copy_to`, whole or not at all."""
        if self.is_main:
            save_model(path, model, metadata)
            if copy_to is not None:
                try:
                    write_atomic(copy_to, lambda tmp: shutil.copyfile(path, tmp))
                except OSError as error:
                    raise write_failure(f"the copy of {path}", copy_to, error) from error
        self.accelerator.wait_for_everyone()


def _agree(accelerator: Accelerator, problem: str | None) -> None:
    """Raise the first process's problem on every process, so no rank goes on alone and hangs."""
    first = next((p for p in (gather_object([problem]) if accelerator.num_processes > 1 else [problem]) if p), None)
    if first:
        raise UserError(first)


def _on_main_for_all(accelerator: Accelerator, fn: Callable[[], Any]) -> Any:
    """fn() on the main process; its result, or its UserError, handed to every process."""
    outcome: list[Any] = [("ok", None)]
    if accelerator.is_main_process:
        try:
            outcome = [("ok", fn())]
        except UserError as error:
            outcome = [("error", str(error))]
    if accelerator.num_processes > 1:
        broadcast_object_list(outcome, from_process=0)
    if outcome[0][0] == "error":
        raise UserError(outcome[0][1])
    return outcome[0][1]


def _start_checks(cfg: Any, spec: RunSpec, run_dir: Path, accelerator: Accelerator):
    """(every reason not to start, found without writing anything, or None; the explicit --resume state, loaded)."""
    problems, listing, resumed = [], None, None
    try:
        spec.validate(cfg, accelerator.num_processes)
    except UserError as error:
        problems.append(str(error))
    try:
        listing = scan_image_folder(cfg.data_dir) if cfg.data_dir else None
    except UserError as error:
        problems.append(str(error))
    try:
        if cfg.resume not in ("auto", "never"):
            resumed = (Path(cfg.resume), *load_training_state(cfg.resume))
    except UserError as error:
        problems.append(f"--resume: {error}")
    if problems or listing is None:
        return "; ".join(problems), None
    if len(listing.class_names) < spec.min_classes:
        return (f"{cfg.data_dir} has {len(listing.class_names)} class folder(s); a {spec.kind} needs at least "
                f"{spec.min_classes} — a one-class classifier predicts that class for anything"), None  # fmt: skip
    if run_dir.resolve().is_relative_to(listing.root.resolve()):  # it would become a class of its own data
        return f"--output-dir {cfg.output_dir} is inside the data folder {cfg.data_dir} — put the runs elsewhere", None
    for output in spec.outputs:
        if output.is_dir():
            return f"{output} is a folder: the weights need a file path there — choose another --output", None
    for path in [run_dir, *(output.parent for output in spec.outputs)]:  # can files be created there?
        existing = next(folder for folder in (path, *path.parents) if folder.exists())
        probe = existing / f".tiny-cats-write-probe-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as error:
            why = "is a file, not a folder" if existing.is_file() else f"cannot be written in ({error.strerror})"
            return f"cannot write the run's outputs: {existing} {why} — choose another --output-dir/--output", None
    # A batch whose images alone cannot fit (float32 copies of all a step holds at once) fails now, not minutes later.
    device, per_rank = accelerator.device, cfg.batch_size // accelerator.num_processes
    have = torch.cuda.mem_get_info(device)[1] if device.type == "cuda" else available_memory_bytes()
    need = (cfg.batch_size * spec.accumulation + 8 * per_rank) * 3 * cfg.image_size**2 * 4
    if have is not None and need > have:
        return (f"--batch-size {cfg.batch_size} cannot fit: the images of one step alone take {need / 1e9:,.1f} GB at "
                f"{cfg.image_size} px and the {device.type} has {have / 1e9:,.1f} GB — lower --batch-size (and raise "
                "--gradient-accumulation-steps to keep the effective batch)"), None  # fmt: skip
    return None, resumed


def as_user_error(error: BaseException) -> UserError | None:
    """The one-line advice for a failure a user can fix: CUDA out-of-memory, a full or read-only disk."""
    if isinstance(error, UserError):
        return error
    if isinstance(error, OSError) and error.errno in (
        errno.ENOSPC,
        errno.EDQUOT,
        errno.EROFS,
        errno.EACCES,
        errno.EPERM,
    ):
        return write_failure("the run's files", Path(error.filename or "."), error)
    advice = describe_gpu_failure(error)
    return UserError(advice) if advice else None


@contextmanager
def open_run(cfg: Any, spec: RunSpec, on_checkpoint: Callable[[Path], None] | None = None) -> Iterator[Run]:
    """Open (or continue) the run of `cfg`; see the module docstring for the order and the promises."""
    run_dir = Path(cfg.output_dir) / cfg.run_name
    tracker = None if cfg.report_to == "none" else cfg.report_to
    accelerator = make_accelerator(cfg.device, cfg.mixed_precision, spec.accumulation, log_with=tracker,
                                   project_dir=cfg.tracker_dir or str(run_dir))  # fmt: skip
    problem, resumed = _start_checks(cfg, spec, run_dir, accelerator)
    try:
        _agree(accelerator, problem)
    except UserError as error:
        if accelerator.is_main_process and name_problem(cfg.run_name) is None:
            append_log_line(run_dir / "training.log", f"refused to start: {error}")
        raise
    lock = RunLock(run_dir)
    _on_main_for_all(accelerator, lock.acquire)
    setup_logger(run_dir / "training.log", accelerator.is_main_process)
    status = StatusFile(run_dir / "status.json", accelerator.is_main_process, run=cfg.run_name, kind=spec.kind)
    run = Run(cfg, spec, accelerator, run_dir, status, lock, on_checkpoint=on_checkpoint)
    if cfg.cpu_threads > 0:  # also when a launcher calls main() itself, not through run_main
        torch.set_num_threads(cfg.cpu_threads)
    try:
        log_run_header(cfg, accelerator)
        if warning := precision_warning(accelerator.mixed_precision, accelerator.device.type):
            log.warning(warning)
        # The main process chooses the checkpoint for all; each loads it itself, so on several machines
        # --output-dir must be a folder they all share.
        chosen = resumed or _on_main_for_all(accelerator, lambda: find_resume_state(cfg.resume, run_dir / STATE_DIR))
        run.resumed = resumed or (chosen and (Path(chosen), *load_training_state(chosen)))
        if accelerator.is_main_process and (removed := remove_unfinished_writes(run_dir / STATE_DIR)):
            log.info("removed %d unfinished checkpoint write(s) left by a killed run", removed)
        with accelerator.local_main_process_first():  # one process per machine builds the cache
            run.cache = load_or_build_cache(cfg.data_dir, cfg.image_size, cfg.cache_dir or None,
                                            show_progress=accelerator.is_main_process)  # fmt: skip
        names = run.cache.class_names
        log.info("data: %d images, %d classes (%s) from %s", len(run.cache), len(names), ", ".join(names), cfg.data_dir)
        if tracker:
            hyperparameters = {k: v for k, v in config_dict(cfg).items() if v is not None}
            accelerator.init_trackers(f"tiny-cats-{spec.kind}", config=hyperparameters)
        yield run
        status.update(state="finished", message=None)
    except (SystemExit, KeyboardInterrupt) as stop:  # a signal or --time-limit (after saving), or a second Ctrl-C
        code = stop.code if isinstance(stop, SystemExit) else "interrupted"
        status.update(state="stopped", message=f"{code}; run the same command to continue")
        raise
    except BaseException as error:
        user_error = as_user_error(error)
        if user_error and not run.begun and not list_complete_states(run_dir / STATE_DIR):
            user_error = UserError(f"{user_error} (nothing was trained: {run_dir} keeps only this start's log)")
        message = str(user_error) if user_error else f"{type(error).__name__}: {error}"
        if user_error:
            log.error("error: %s", message)
        else:
            log.exception("crashed")
        status.update(state="failed", message=message)
        if user_error is not None and user_error is not error:
            raise user_error from error
        raise
    finally:
        if tracker:
            accelerator.end_training()
        if accelerator.is_main_process:
            lock.release()
