"""Turning dataclass configs into command lines, and user errors into one clear message.

Every script defines one dataclass config. `build_parser` generates the argparse parser from it
(kebab-case flags, defaults shown in --help), so a flag can never be parsed and then ignored.
`config_to_argv` is the way back, for launchers that start a command in another process. `run_main` is
the shared `if __name__ == "__main__"` body: a `UserError` ends the program with one line on stderr and
exit status 2 instead of a traceback.

Exit statuses every command shares (launchers such as modal_app.py act on them):
0 done; 2 a user error (a retry would fail the same way); 75 stopped at --time-limit after saving (run the
same command again to continue); 128 + N stopped by signal N after saving (130 Ctrl-C/SIGINT, 143 SIGTERM).
Each process exits with these; `accelerate launch --multi_gpu` itself returns 1 whenever a worker exits
non-zero (measured), so a launcher of several processes reads each rank's own status (scripts/lib/attempts.py).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import signal
import sys
import typing
import unicodedata
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TypeVar

from scripts.lib.host_memory import reuse_freed_memory

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
