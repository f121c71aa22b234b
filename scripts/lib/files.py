"""Writing files so that a failure leaves nothing half-written and says in one line what to do."""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import uuid
from pathlib import Path

from scripts.lib.cli import UserError, printable


def write_failure(what: str, path: Path, error: Exception) -> UserError:
    """One line for a write that failed: what, where, the system's reason, and what to do about it."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    code = getattr(error, "errno", None)
    if code is None:  # safetensors reports the OS error inside its message: "... (os error 28)"
        found = re.search(r"os error (\d+)", reason)
        code = int(found.group(1)) if found else None
    writable = f"make {printable(path.parent)} writable"
    free = f"free disk space there ({free_space(path)} free now)"
    advice = {
        errno.EACCES: writable,
        errno.EPERM: writable,
        errno.EROFS: writable,
        errno.ENOSPC: free,
        errno.EDQUOT: free,
    }.get(code, f"{free} or {writable}")
    return UserError(
        f"could not write {what} to {printable(path)} ({printable(reason[:300])}) — {advice}, or "
        "write to another folder; nothing saved before was changed"
    )


def free_space(path: Path) -> str:
    existing = next((folder for folder in (path, *path.parents) if folder.exists()), None)
    try:
        free = shutil.disk_usage(existing).free if existing is not None else None
    except OSError:
        free = None
    return "unknown" if free is None else f"{free / 2**20:,.0f} MiB"


def write_text_atomic(path: Path, text: str) -> None:
    """Replace `path` with `text` whole, or leave it as it was (a failed write removes its temp file)."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise


def copy_file_atomic(source: Path, target: Path) -> None:
    """Copy `source` over `target` so that a reader sees the old file or the new one, never half of one.

    The temporary name is unique to this process: several runs may copy into one folder at once (every DiT run
    puts its final weights at <output-dir>/tinydit_final.safetensors).
    """
    tmp = target.with_name(f".{target.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        shutil.copyfile(source, tmp)
        os.replace(tmp, target)
    except OSError:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
