"""Run directories and logging: `checkpoints/<run-name>/` with config.json, training.log, metrics.jsonl and
status.json (where the run stands now, for people and launchers that poll it).

Only the main process writes files; every process may call these functions (they become no-ops or
console-only elsewhere), which keeps the trainers free of `if is_main` clutter.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import socket
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

LOGGER_NAME = "tiny_cats"
_FORMAT = "%(asctime)s %(levelname)s %(message)s"
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def default_run_name(prefix: str) -> str:
    """A fresh, sortable run name such as `dit-20261128-213012`."""
    return f"{prefix}-{datetime.now().strftime('%Y%m%d-%H%M%S')}"


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
        file_handler = logging.FileHandler(log_file, encoding="utf-8")
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
