"""What every command shares: flags from a dataclass config, one-line errors and exit statuses, safe writes."""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import functools
import json
import os
import re
import shutil
import signal
import sys
import typing
import unicodedata
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

import torch

# ====================================================================================================
# Turning dataclass configs into command lines, and user errors into one clear message.
# ====================================================================================================


ConfigT = TypeVar("ConfigT")


EXIT_USER_ERROR = 2


EXIT_TIME_LIMIT = 75  # EX_TEMPFAIL: not finished, resumable


EXIT_SIGNAL_BASE = 128


PRESET_FLAG = "--preset"


class UserError(Exception):
    """A problem the user can fix (bad path, bad flag, corrupt data, OOM...). The message says how."""


# Characters a file or folder name may hold that must not reach a log line or a terminal as they are: controls
# (a newline would split or forge a line, ESC drives the terminal), line/paragraph separators, lone surrogates
# (the undecodable bytes of a name, which a UTF-8 stream refuses to print), and the bidirectional overrides and
# isolates (U+202E shows the rest of a line reversed). Other format characters, like the joiners inside emoji,
# are harmless.
_ESCAPED_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})


_ESCAPED_BIDI_CLASSES = frozenset({"LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI"})


def _needs_escape(char: str) -> bool:
    return unicodedata.category(char) in _ESCAPED_CATEGORIES or unicodedata.bidirectional(char) in _ESCAPED_BIDI_CLASSES


def printable(text: object) -> str:
    """`str(text)` with the characters above written as escapes (\\n, \\x1b, \\u202e): one line, shown as stored."""
    return "".join(char.encode("unicode_escape").decode("ascii") if _needs_escape(char) else char for char in str(text))


def flag_name(field: dataclasses.Field) -> str:
    """The command-line spelling of a config field: --kebab-case, or the field's own `flag`."""
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def option(
    default: Any, help: str, *, choices: Sequence[Any] | None = None, positional: bool = False, flag: str | None = None
) -> Any:
    """A dataclass field carrying its command-line help (and optional choices / positional-ness).

    `flag` overrides the generated flag name, e.g. `--class` for a field that must be called `classes`.
    """
    metadata = {"help": help, "choices": choices, "positional": positional, "flag": flag}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def _scalar_type(annotation: Any) -> Any:
    """The argparse `type` for a field annotation like `int`, `float | None`, `list[str]`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is list:
        return args[0]
    if args:  # Optional[X] / X | None
        return _scalar_type(args[0])
    return annotation


def build_parser(config_cls: type, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one option per dataclass field, defaults listed in --help."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        meta = field.metadata
        annotation = hints[field.name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        kwargs: dict[str, Any] = {"help": meta.get("help", "")}
        if meta.get("positional"):
            names = [field.name]
            if default is not None:
                kwargs["nargs"] = "?"
        else:
            names = [flag_name(field)]
            kwargs["dest"] = field.name
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        else:
            kwargs["type"] = _scalar_type(annotation)
            if typing.get_origin(annotation) is list:
                kwargs["nargs"] = "*" if meta.get("positional") else "+"
            if meta.get("choices") is not None:
                kwargs["choices"] = list(meta["choices"])
        kwargs["default"] = default
        parser.add_argument(*names, **kwargs)
    parser.add_argument(
        PRESET_FLAG,
        metavar="FILE.json",
        help="settings kept in a file: a JSON object of option values, keyed as in a run's config.json, used "
        "instead of the defaults (options given on the command line still win)",
    )
    return parser


def parse_config(config_cls: type[ConfigT], argv: Sequence[str] | None, description: str) -> ConfigT:
    """Parse argv (None = sys.argv[1:]) into a config instance, over the defaults of a --preset file if given."""
    parser = build_parser(config_cls, description)
    first_pass = argparse.ArgumentParser(add_help=False)
    first_pass.add_argument(PRESET_FLAG)
    preset = first_pass.parse_known_args(argv)[0].preset
    if preset:
        parser.set_defaults(**read_preset(Path(preset), config_cls))
    values = vars(parser.parse_args(argv))
    values.pop("preset")
    return config_cls(**values)


def read_preset(path: Path, config_cls: type) -> dict[str, Any]:
    """The option values of a preset file, each checked against its config field (UserError otherwise)."""
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise UserError(f"--preset {path}: not a readable JSON file ({error})") from error
    if not isinstance(values, dict):
        raise UserError(f"--preset {path}: expected a JSON object of option values, like a run's config.json")
    fields = {field.name: field for field in dataclasses.fields(config_cls)}
    hints = typing.get_type_hints(config_cls)
    for key, value in values.items():
        field = fields.get(key)
        if field is None:
            raise UserError(f"--preset {path}: {key!r} is not an option of this command (see --help)")
        problem = _value_problem(value, hints[key], field.metadata.get("choices"))
        if problem:
            raise UserError(f"--preset {path}: {key} {problem}")
    return values


def _value_problem(value: Any, annotation: Any, choices: Sequence[Any] | None) -> str | None:
    if value is None:
        return None if type(None) in typing.get_args(annotation) else "may not be null"
    expected = _scalar_type(annotation)
    items = value if typing.get_origin(annotation) is list else [value]
    if typing.get_origin(annotation) is list and not isinstance(value, list):
        return f"must be a list of {expected.__name__}"
    accepted = (int, float) if expected is float else expected
    if any(isinstance(item, bool) != (expected is bool) or not isinstance(item, accepted) for item in items):
        return f"must be of type {expected.__name__} (got {value!r})"
    if choices is not None and any(item not in choices for item in items):
        return f"must be one of {', '.join(map(str, choices))} (got {value!r})"
    return None


def config_to_argv(cfg: Any) -> list[str]:
    """The command line that `parse_config` turns back into exactly `cfg` (for a command started elsewhere)."""
    argv: list[str] = []
    for field in dataclasses.fields(cfg):
        value = getattr(cfg, field.name)
        if field.metadata.get("positional"):
            argv.extend(str(v) for v in (value if isinstance(value, list) else [value]))
        elif isinstance(value, bool):
            if value != field.default:
                argv.append(flag_name(field) if value else "--no-" + flag_name(field)[2:])
        elif value is None:
            if field.default is not None:
                raise ValueError(f"{field.name}=None has no flag spelling (its default is {field.default!r})")
        elif isinstance(value, list):
            argv.extend([flag_name(field), *(str(v) for v in value)])
        else:
            argv.extend([flag_name(field), str(value)])
    return argv


def parse_duration(text: str) -> float:
    """Seconds from `5400`, `90m`, `23h30m`, `1h30m15s` or `45s`; UserError otherwise."""
    value = text.strip().lower()
    if value.replace(".", "", 1).isdigit():
        return float(value)
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", value)
    if not value or match is None:
        raise UserError(
            f"cannot read the duration {text!r} — use seconds (5400) or hours/minutes/seconds like 23h30m, 90m, 45s"
        )
    hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return float(hours * 3600 + minutes * 60 + seconds)


def run_main(main: Callable[[Any], Any], config_cls: type, description: str, argv: Sequence[str] | None = None) -> None:
    """Parse the command line, run main(cfg), and turn a UserError into one line and exit status 2."""
    reuse_freed_memory()  # every script of the kit runs its tensors on a heap that keeps freed pages
    try:
        main(parse_config(config_cls, argv, description))
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(EXIT_SIGNAL_BASE + signal.SIGINT)


# ====================================================================================================
# Writing files so that a failure leaves nothing half-written and says in one line what to do.
# ====================================================================================================


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


# ====================================================================================================
# Host memory: how much is still available, and keeping freed memory for reuse.
# ====================================================================================================


# mallopt parameters (malloc.h)
_M_TRIM_THRESHOLD = -1


_M_MMAP_THRESHOLD = -3


# Blocks up to this size come from the heap; glibc's ceiling for it on 64-bit.
MMAP_THRESHOLD_BYTES = 32 * 2**20


# Free memory at the heap top that glibc keeps instead of returning it to the kernel: the largest int.
TRIM_THRESHOLD_BYTES = 2**31 - 1


@functools.cache
def reuse_freed_memory() -> bool:
    """Tune glibc malloc as above; True when it took effect, False where malloc is not glibc's (macOS, musl)."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        libc = None
    if libc is None or not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    mallopt = libc.mallopt
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES))


# ====================================================================================================
# Device, precision, compilation and the Accelerator both trainers run on, and GPU errors turned into advice.
# ====================================================================================================


DEVICES = ("auto", "cpu", "cuda", "mps")


def resolve_device_type(requested: str) -> str:
    """'auto' becomes cuda > mps > cpu; an explicit device that is not there is a user error."""
    cuda_ok = torch.cuda.is_available()
    mps_ok = torch.backends.mps.is_available()
    if requested == "auto":
        return "cuda" if cuda_ok else "mps" if mps_ok else "cpu"
    if requested == "cuda" and not cuda_ok:
        raise UserError("--device cuda was asked for but no CUDA GPU is visible — use --device cpu (or auto)")
    if requested == "mps" and not mps_ok:
        raise UserError("--device mps was asked for but Apple MPS is not available — use --device cpu (or auto)")
    return requested
