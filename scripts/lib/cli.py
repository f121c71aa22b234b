"""What every command shares: flags from a dataclass config, names (runs, data sets, classes), one-line errors and exit

`build_parser` makes a script's flags from its dataclass config (kebab-case, defaults in --help), so no flag is parsed
and then ignored; `config_to_argv` is the way back for launchers. `run_main` is every script's `__main__`.
Exit statuses (launchers such as modal_app.py act on them): 0 done; 2 a `UserError`, one line on stderr (a retry would
fail the same way); 75 stopped at --time-limit after saving (run the same command to continue); 128 + N stopped by
signal N after saving (130 Ctrl-C, 143 SIGTERM). Under a multi-process launcher, which itself returns 1 whenever a
worker fails, each process also writes its own status to $TINY_CATS_EXIT_DIR/rank<RANK> when that variable is set.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import ctypes.util
import dataclasses
import errno
import functools
import json
import math
import os
import re
import shutil
import signal
import sys
import typing
import unicodedata
import uuid
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any, TypeVar

ConfigT = TypeVar("ConfigT")
EXIT_USER_ERROR, EXIT_TIME_LIMIT, EXIT_SIGNAL_BASE = 2, 75, 128  # 75 = EX_TEMPFAIL: not finished, resumable
EXIT_DIR_ENV = "TINY_CATS_EXIT_DIR"
LOGGER_NAME = "tiny_cats"  # the one logger of the kit: training.log and data warnings
PROJECT_ROOT = Path(__file__).resolve().parents[2]  # holds models/ and scripts/
DEVICES = ("auto", "cpu", "cuda", "mps")
MAX_PRESET_BYTES = 1 << 20  # a preset is a config.json: a few kB; /dev/zero must not be read to the end
MAX_NAME_CHARS = 255  # a file name, on every common file system


class UserError(Exception):
    """A problem the user can fix (bad path, bad flag, corrupt data, OOM...). The message says how."""


def project_env() -> dict[str, str]:
    """This process's environment for a command run from source: the project first on PYTHONPATH (its scripts import
    models/ and scripts/ from there), the user's own entries after it."""
    path = os.pathsep.join(filter(None, (str(PROJECT_ROOT), os.environ.get("PYTHONPATH"))))
    return {**os.environ, "PYTHONPATH": path}


# Characters a name must not bring to a log line or terminal as they are: controls (a newline forges a line, ESC
# drives the terminal), line/paragraph separators, lone surrogates (undecodable bytes of a file name) and the
# bidirectional overrides and isolates (U+202E shows the rest of a line reversed).
_ESCAPED_CATEGORIES = frozenset({"Cc", "Zl", "Zp", "Cs"})
_ESCAPED_BIDI = frozenset({"LRE", "RLE", "LRO", "RLO", "PDF", "LRI", "RLI", "FSI", "PDI"})


def printable(text: object) -> str:
    """`str(text)` with the characters above written as escapes (\\n, \\x1b, \\u202e): one line, shown as stored."""
    return "".join(
        c.encode("unicode_escape").decode("ascii")
        if unicodedata.category(c) in _ESCAPED_CATEGORIES or unicodedata.bidirectional(c) in _ESCAPED_BIDI
        else c
        for c in str(text)
    )


def name_problem(name: object) -> str | None:
    """Why `name` cannot be one plain path component (a run, data set or class name), or None."""
    if not isinstance(name, str) or not 1 <= len(name) <= MAX_NAME_CHARS:
        return f"is not a name of 1 to {MAX_NAME_CHARS} characters"
    if printable(name) != name:
        return "holds a control, line-break or text-direction character"
    if "/" in name or "\\" in name or name in (".", ".."):
        return "is a path, not a plain name (no /, \\, . or ..)"
    return None


# --- Image folders: names a data set may use (no torch: the toy-set and import commands start fast) -------------
IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def is_hidden_name(name: str) -> bool:
    """Folders like .ipynb_checkpoints, .tiny-cats-cache or __pycache__ are tool clutter, not classes."""
    return name.startswith((".", "__"))


def class_names_problem(names: list[str]) -> str | None:
    """Why these names cannot be one data set's classes (the first reason), or None. Class names are folder names that
    reach checkpoint metadata, log lines and the file names sample.py writes; two spellings of one name
    (NFC "café" and NFD "café") print identically, so they are one class name twice, not two classes."""
    seen: dict[str, str] = {}
    for name in names:
        if problem := name_problem(name):
            return f"'{printable(name)}': the name {problem}"
        if (key := unicodedata.normalize("NFC", name)) in seen:
            return f"'{printable(seen[key])}' and '{printable(name)}' are one name in two Unicode spellings"
        seen[key] = name
    return None


def check_class_names(root: Path, names: list[str]) -> None:
    if problem := class_names_problem(names):
        raise UserError(f"class folders of {printable(root)}: {problem} — rename the folder")


def class_folders(root: Path) -> list[Path]:
    """The class subfolders of an image folder DIR/<class>/*.jpg, sorted by name."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not is_hidden_name(p.name))


def refuse_foreign_classes(out: Path, allowed: Iterable[str]) -> None:
    """Stop before writing into a folder that already holds other classes: every subfolder of an ImageFolder is a
    class, so e.g. toy cats and Oxford breeds in one `data/cats` would silently mix."""
    allowed = set(allowed)
    if foreign := [p.name for p in (class_folders(out) if out.is_dir() else []) if p.name not in allowed]:
        raise UserError(f"{printable(out)} already holds other classes ({printable(', '.join(foreign[:6]))}) that "
                        "would mix into this data set — remove them or choose another output folder")  # fmt: skip


# --- Configs <-> command lines -----------------------------------------------------------------------------------
def option(default: Any, help: str, *, choices: Sequence[Any] | None = None, positional: bool = False, flag=None):
    """A dataclass field carrying its command-line help, choices, positional-ness and (rarely) its own flag name."""
    metadata = {"help": help, "choices": choices, "positional": positional, "flag": flag}
    if isinstance(default, list | dict):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def cpu_threads_option() -> Any:
    return option(0, "CPU threads of torch (0: torch's default, one per core; see the README on shared machines)")


def flag_name(field: dataclasses.Field) -> str:
    return field.metadata.get("flag") or "--" + field.name.replace("_", "-")


def _scalar_type(annotation: Any) -> Any:
    """The argparse `type` of an annotation like `int`, `float | None`, `list[str]`."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if typing.get_origin(annotation) is list:
        return args[0]
    return _scalar_type(args[0]) if args else annotation


def build_parser(config_cls: type, description: str) -> argparse.ArgumentParser:
    """An argparse parser with one option per dataclass field, defaults listed in --help."""
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    hints = typing.get_type_hints(config_cls)
    for field in dataclasses.fields(config_cls):
        meta, annotation = field.metadata, hints[field.name]
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        kwargs: dict[str, Any] = {"help": meta.get("help", ""), "default": default}
        if meta.get("positional"):
            names = [field.name]
            kwargs.update({"nargs": "?"} if default is not None else {})
        else:
            names, kwargs["dest"] = [flag_name(field)], field.name
        if annotation is bool:
            kwargs["action"] = argparse.BooleanOptionalAction if default else "store_true"
        else:
            kwargs["type"] = _scalar_type(annotation)
            if typing.get_origin(annotation) is list:
                kwargs["nargs"] = "*" if meta.get("positional") else "+"
            if meta.get("choices") is not None:
                kwargs["choices"] = list(meta["choices"])
        parser.add_argument(*names, **kwargs)
    preset_help = "option values kept in a JSON file, keyed as in a run's config.json (the command line still wins)"
    parser.add_argument("--preset", metavar="FILE.json", help=preset_help)
    return parser


def parse_config(config_cls: type[ConfigT], argv: Sequence[str] | None, description: str) -> ConfigT:
    """argv (None = sys.argv[1:]) as a config, over a --preset file's values; a non-finite float is refused."""
    parser = build_parser(config_cls, description)
    first_pass = argparse.ArgumentParser(add_help=False)  # the preset's values are defaults, in --help too
    first_pass.add_argument("--preset")
    if preset := first_pass.parse_known_args(argv)[0].preset:
        parser.set_defaults(**read_preset(Path(preset), config_cls))
    cfg = config_cls(**{name: value for name, value in vars(parser.parse_args(argv)).items() if name != "preset"})
    if problems := non_finite_flags(cfg):
        raise UserError("; ".join(problems))
    return cfg


def refuse(refusals: dict[str, bool]) -> None:
    """A command's table of flag checks (message -> whether it applies): one UserError naming each that applies."""
    if applying := [message for message, applies in refusals.items() if applies]:
        raise UserError("; ".join(applying))


def non_finite_flags(cfg: Any) -> list[str]:
    """`--flag nan: not a finite number` for each float field holding NaN or inf (argparse's float() takes both)."""
    return [
        f"{flag_name(field)} {value}: not a finite number"
        for field in dataclasses.fields(cfg)
        if isinstance(value := getattr(cfg, field.name), float) and not math.isfinite(value)
    ]


def read_preset(path: Path, config_cls: type) -> dict[str, Any]:
    """A preset's option values, each checked against its config field (one UserError line otherwise)."""
    try:
        with open(path, "rb") as handle:
            text = handle.read(MAX_PRESET_BYTES + 1)
        if len(text) > MAX_PRESET_BYTES:
            raise ValueError(f"larger than {MAX_PRESET_BYTES // 1024} KiB")
        values = json.loads(text)
    except (OSError, ValueError, RecursionError) as error:
        raise UserError(f"--preset {path}: not a readable JSON file ({printable(str(error)[:200])})") from None
    if not isinstance(values, dict):
        raise UserError(f"--preset {path}: expected a JSON object of option values, like a run's config.json")
    fields, hints = {f.name: f for f in dataclasses.fields(config_cls)}, typing.get_type_hints(config_cls)
    for key, value in values.items():
        if key not in fields:
            raise UserError(f"--preset {path}: {printable(key)!r} is not an option of this command (see --help)")
        if problem := _value_problem(value, hints[key], fields[key].metadata.get("choices")):
            raise UserError(f"--preset {path}: {key} {problem}")
    return values


def _value_problem(value: Any, annotation: Any, choices: Sequence[Any] | None) -> str | None:
    if value is None:
        return None if type(None) in typing.get_args(annotation) else "may not be null"
    expected, is_list = _scalar_type(annotation), typing.get_origin(annotation) is list
    if is_list and not isinstance(value, list):
        return f"must be a list of {expected.__name__}"
    accepted = (int, float) if expected is float else expected
    items = value if is_list else [value]
    if any(isinstance(item, bool) != (expected is bool) or not isinstance(item, accepted) for item in items):
        return f"must be of type {expected.__name__} (got {printable(repr(value))[:100]})"
    if choices is not None and any(item not in choices for item in items):
        return f"must be one of {', '.join(map(str, choices))} (got {printable(repr(value))[:100]})"
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
        else:
            argv.extend([flag_name(field), *map(str, value if isinstance(value, list) else [value])])
    return argv


def parse_duration(text: str) -> float:
    """Seconds from `5400`, `90m`, `23h30m`, `1h30m15s` or `45s`; UserError otherwise."""
    value = text.strip().lower()
    if value.replace(".", "", 1).isdigit():
        return float(value)
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", value)
    if not value or match is None:
        raise UserError(f"cannot read the duration {text!r} — use seconds (5400) or hours/minutes like 23h30m, 45s")
    hours, minutes, seconds = (int(part or 0) for part in match.groups())
    return float(hours * 3600 + minutes * 60 + seconds)


def resolve_device_type(requested: str) -> str:
    """--device: 'auto' becomes cuda > mps > cpu; an explicit device that is not there is a user error."""
    import torch

    available = {"cuda": torch.cuda.is_available(), "mps": torch.backends.mps.is_available(), "cpu": True}
    if requested == "auto":
        return next(device for device in ("cuda", "mps", "cpu") if available[device])
    if not available[requested]:
        raise UserError(f"--device {requested} was asked for but it is not available here — use --device cpu or auto")
    return requested


def run_main(main: Callable[[Any], Any], config_cls: type, description: str, argv: Sequence[str] | None = None) -> None:
    """Parse the command line and run main(cfg); a UserError becomes one line and exit status 2."""
    reuse_freed_memory()
    status = 1  # an exception escaping main is a crash
    try:
        cfg = parse_config(config_cls, argv, description)
        if getattr(cfg, "cpu_threads", 0) > 0:
            import torch

            torch.set_num_threads(cfg.cpu_threads)
        main(cfg)
        status = 0
    except UserError as error:
        print(f"error: {error}", file=sys.stderr)
        status = EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        status = EXIT_SIGNAL_BASE + signal.SIGINT
    except SystemExit as stop:
        status = stop.code if isinstance(stop.code, int) else int(stop.code is not None)
    finally:
        if os.environ.get(EXIT_DIR_ENV):
            Path(os.environ[EXIT_DIR_ENV], f"rank{os.environ.get('RANK', '0')}").write_text(str(status))
    sys.exit(status)


# --- Writing outputs: whole or not at all, with the permissions the umask gives, one line when it fails ----------
_UMASK = os.umask(0)
os.umask(_UMASK)
FILE_MODE = 0o666 & ~_UMASK  # what a plain open() gives: some writers, safetensors among them, create files 0600


def write_atomic(path: Path, content: str | bytes | Iterable[bytes] | Callable[[Path], None]) -> Path:
    """Replace `path` with `content` (text, bytes, chunks of bytes, or a writer called with a temporary path): a reader
    sees the old file or the new one, never half of one. The temporary name is unique: several processes may write
    one file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{uuid.uuid4().hex[:8]}.tmp")
    try:
        if callable(content):
            content(tmp)
        elif isinstance(content, str | bytes):
            tmp.write_bytes(content.encode() if isinstance(content, str) else content)
        else:
            with open(tmp, "wb") as handle:
                handle.writelines(content)
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise
    return path


def save_output(path: Path, content: str | bytes | Iterable[bytes] | Callable[[Path], None], what: str) -> Path:
    """`write_atomic` into a folder made as needed; a failure is one line that names `what`."""
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return write_atomic(Path(path), content)
    except OSError as error:
        raise write_failure(what, Path(path), error) from error


def write_json(path: Path, data: Any, what: str) -> Path:
    """`data` as indented JSON through `save_output`, NaN/inf as null (JSON has neither; json.dumps writes them)."""
    text = json.dumps(data, default=float)  # default: numpy scalars
    return save_output(path, json.dumps(json.loads(text, parse_constant=lambda _: None), indent=2) + "\n", what)


def write_failure(what: str, path: Path, error: Exception) -> UserError:
    """One line for a write that failed: what, where, the system's reason, and what to do about it."""
    reason = error.strerror if isinstance(error, OSError) and error.strerror else str(error)
    found = re.search(r"os error (\d+)", reason)  # safetensors reports the OS error inside its message
    code = getattr(error, "errno", None) or (int(found.group(1)) if found else None)
    try:
        existing = next(folder for folder in (path, *path.parents) if folder.exists())
        space = f"free disk space there ({shutil.disk_usage(existing).free / 2**20:,.0f} MiB free now)"
    except (OSError, StopIteration):
        space = "free disk space there"
    access = f"make {printable(path.parent)} writable"
    advice = {errno.EACCES: access, errno.EPERM: access, errno.EROFS: access, errno.ENOSPC: space, errno.EDQUOT: space}
    otherwise = f"make sure {printable(path.parent)} is a folder you can write in"
    return UserError(
        f"could not write {what} to {printable(path)} ({printable(reason[:300])}) — "
        f"{advice.get(code, otherwise)}, or write to another folder; nothing saved before was changed"
    )


# glibc malloc hands large freed blocks (a DiT's activations are 2-16 MiB) back to the kernel, so every step re-faults
# fresh pages (a quarter of a T/4 forward at batch 64): higher mmap and trim thresholds keep them in the heap.
MMAP_THRESHOLD_BYTES, TRIM_THRESHOLD_BYTES = 32 * 2**20, 2**31 - 1
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # mallopt parameters (malloc.h)


@functools.cache
def reuse_freed_memory() -> bool:
    """Tune glibc malloc as above; True when it took effect, False where malloc is not glibc's (macOS, musl)."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))  # None: the symbols of this process
    except (OSError, TypeError):
        return False
    if not hasattr(libc, "mallopt") or not hasattr(libc, "gnu_get_libc_version"):
        return False
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    return bool(
        libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD_BYTES)
    )
