"""Resumable training state without pickle: a folder `state/step_0001000/` with every component's state dict
flattened to `state.safetensors` (tensors) + `state.json` (structure and scalars). It is written to a temporary
folder, renamed into place and only then marked complete by a `COMPLETE` file naming its step, so a kill at any
moment leaves either a complete checkpoint or one that is ignored (and removed at the next save); anything
this module did not write is refused with one line.
"""

from __future__ import annotations

import json
import os
import reprlib
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from scripts.lib.cli import UserError, printable
from scripts.lib.files import write_failure, write_text_atomic

STATE_DIR_PREFIX = "step_"
COMPLETE_MARKER = "COMPLETE"
_TENSORS_FILE = "state.safetensors"
_STRUCTURE_FILE = "state.json"
# The tags of state.json: a tensor (by its name in state.safetensors), a tuple, a dict (as [key, value] pairs).
_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"
# A trainer's state is at most 6 levels deep (optimizer -> state -> parameter -> moment); a structure nested far
# deeper was not written by save_training_state and would otherwise end in a RecursionError.
MAX_STATE_DEPTH = 32


# ---------------------------------------------------------------------------------------------------------
# Nested state dicts <-> (flat tensors, JSON structure)
# ---------------------------------------------------------------------------------------------------------
def flatten_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """Split a nested state (dicts with str/int keys, lists, tuples, tensors, scalars) into tensors + JSON.

    Optimizer state dicts have int keys and RNG states are uint8 tensors; both survive the round trip.
    """
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().to("cpu").contiguous().clone()
            return {_TENSOR: path}
        if isinstance(value, dict):
            bad_keys = [key for key in value if not _is_state_key(key)]
            if bad_keys:
                raise TypeError(f"cannot store the {type(bad_keys[0]).__name__} key {bad_keys[0]!r} at {path}")
            return {_DICT: [[key, encode(item, f"{path}.{key}")] for key, item in value.items()]}
        if isinstance(value, tuple):
            return {_TUPLE: [encode(item, f"{path}.{i}") for i, item in enumerate(value)]}
        if isinstance(value, list):
            return [encode(item, f"{path}.{i}") for i, item in enumerate(value)]
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise TypeError(f"cannot store {type(value).__name__} at {path} in a checkpoint")

    return tensors, encode(state, "state")


def _is_state_key(key: Any) -> bool:
    return isinstance(key, str) or type(key) is int


def unflatten_state(tensors: dict[str, torch.Tensor], structure: Any, depth: int = 0) -> Any:
    """Inverse of `flatten_state`. ValueError, with the reason, for anything it cannot have written: unknown
    tags, references to absent tensors, malformed dict entries, nesting deeper than MAX_STATE_DEPTH."""
    if depth > MAX_STATE_DEPTH:
        raise ValueError(f"the structure is nested deeper than {MAX_STATE_DEPTH} levels")
    if isinstance(structure, list):
        return [unflatten_state(tensors, item, depth + 1) for item in structure]
    if not isinstance(structure, dict):
        return structure  # a JSON scalar
    if len(structure) != 1:
        raise ValueError(f"unknown entry {reprlib.repr(structure)}")
    ((tag, body),) = structure.items()
    if tag == _TENSOR:
        if not isinstance(body, str) or body not in tensors:
            raise ValueError(f"it refers to a tensor {reprlib.repr(body)} that {_TENSORS_FILE} does not hold")
        return tensors[body]
    if tag == _TUPLE and isinstance(body, list):
        return tuple(unflatten_state(tensors, item, depth + 1) for item in body)
    if tag == _DICT and isinstance(body, list):
        malformed = [
            pair for pair in body if not (isinstance(pair, list) and len(pair) == 2 and _is_state_key(pair[0]))
        ]
        if malformed:
            raise ValueError(f"malformed dict entry {reprlib.repr(malformed[0])}")
        return {key: unflatten_state(tensors, item, depth + 1) for key, item in body}
    raise ValueError(f"unknown entry {reprlib.repr(structure)}")


# ---------------------------------------------------------------------------------------------------------
# Training state folders
# ---------------------------------------------------------------------------------------------------------
def state_dir_name(step: int) -> str:
    return f"{STATE_DIR_PREFIX}{step:07d}"


def _step_of(folder: Path) -> int | None:
    suffix = folder.name[len(STATE_DIR_PREFIX) :]
    if not folder.name.startswith(STATE_DIR_PREFIX) or not (suffix.isascii() and suffix.isdigit()):
        return None
    return int(suffix)


def _marker_step(folder: Path) -> int | None:
    """The step the folder's COMPLETE marker names, or None: no marker, or one this kit did not write."""
    try:
        text = (folder / COMPLETE_MARKER).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every folder named like a training state, oldest first; nothing else is ever touched."""
    if not root.is_dir():
        return []
    return sorted(
        (step, folder) for folder in root.iterdir() if (step := _step_of(folder)) is not None and folder.is_dir()
    )


def list_complete_states(state_root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint (its marker names its step), oldest first. Foreign, partial
    or hand-marked folders are ignored."""
    return [(step, folder) for step, folder in _step_folders(Path(state_root)) if _marker_step(folder) == step]


def find_resume_state(resume: str, state_root: str | Path) -> Path | None:
    """The state folder a run continues from, or None for a fresh start.

    `resume` is the trainers' --resume: "auto" (the newest complete state, if any), "never" (refused when
    the run already has states, so two runs never mix in one folder) or the path of a state folder, refused
    with one line unless it is a complete one (load_training_state checks its contents).
    """
    states = list_complete_states(state_root)
    if resume == "never":
        if states:
            raise UserError(
                f"run {Path(state_root).parent} already has checkpoints (newest step {states[-1][0]}); "
                "--resume never would mix two runs there — pick another --run-name, or use "
                "--resume auto to continue it"
            )
        return None
    if resume == "auto":
        return states[-1][1] if states else None
    _refuse_unusable(Path(resume), _marked_step)  # e.g. the run folder itself, or a state whose write never ended
    return Path(resume)


def remove_unfinished_writes(state_root: str | Path) -> int:
    """Delete the temp folders of state writes a killed run left behind (each is a whole state's size)."""
    root = Path(state_root)
    leftovers = list(root.glob(".tmp-*")) if root.is_dir() else []
    for folder in leftovers:
        shutil.rmtree(folder)
    return len(leftovers)


def save_training_state(state_root: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Write `state` (nested, see flatten_state) to `state_root/step_N/` atomically and mark it complete.

    A write that fails (disk full, no permission) removes what it wrote, leaves every earlier checkpoint as it
    was and raises one UserError line that says what failed and what to do.
    """
    root = Path(state_root)
    final = root / state_dir_name(step)
    tmp = root / f".tmp-{state_dir_name(step)}-{os.getpid()}"
    tensors, structure = flatten_state(state)
    try:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
        save_file(tensors, str(tmp / _TENSORS_FILE))
        (tmp / _STRUCTURE_FILE).write_text(json.dumps({"step": step, "state": structure}))
        _fsync_tree(tmp)
        if final.exists():  # an incomplete leftover of a killed run at the same step
            shutil.rmtree(final)
        os.replace(tmp, final)
        # The marker is written whole or not at all: a disk that fills up here cannot leave an empty "COMPLETE".
        write_text_atomic(final / COMPLETE_MARKER, f"{step}\n")
        _fsync_tree(final)
    except (OSError, SafetensorError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if _marker_step(final) != step:  # renamed but never marked: remove it, nothing else
            shutil.rmtree(final, ignore_errors=True)
        raise write_failure(f"the training state of step {step}", final, error) from error
    return final


def _fsync_tree(folder: Path) -> None:
    # Data must reach the disk before the rename/marker does, or a power cut could leave a "complete" husk.
    for file in folder.iterdir():
        with open(file, "rb") as handle:
            os.fsync(handle.fileno())
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


class _NotAState(Exception):
    """Why a folder is not a training state that save_training_state wrote."""


def load_training_state(folder: str | Path) -> tuple[int, dict[str, Any]]:
    """Read a complete state folder: (step, state).

    Anything but a state written by save_training_state is refused with one UserError line: no folder, no (or a
    hand-made) COMPLETE marker, missing or unreadable files, a structure it cannot have written, or a step that
    disagrees with the folder's name or its marker.
    """
    return _refuse_unusable(Path(folder), _read_state)


def _refuse_unusable(folder: Path, read: Callable[[Path], Any]) -> Any:
    """`read(folder)`, with its _NotAState turned into the one line the user sees."""
    try:
        return read(folder)
    except _NotAState as reason:
        raise UserError(
            f"{printable(folder)} is not a complete training-state checkpoint: {printable(reason)} — "
            f"pass a folder like <run>/state/{state_dir_name(10000)} or use --resume auto"
        ) from None


def _marked_step(folder: Path) -> int:
    """The step a state folder's marker names; _NotAState when there is no folder or no such marker."""
    if not folder.is_dir():
        raise _NotAState("a file, not a folder" if folder.exists() else "no such folder")
    if not (folder / COMPLETE_MARKER).is_file():
        raise _NotAState(f"no {COMPLETE_MARKER} marker (a write that never finished, or not a state folder)")
    marked = _marker_step(folder)
    if marked is None:
        raise _NotAState(f"its {COMPLETE_MARKER} marker names no step (this kit writes the step number in it)")
    return marked


def _read_state(folder: Path) -> tuple[int, dict[str, Any]]:
    marked = _marked_step(folder)
    try:
        saved = json.loads((folder / _STRUCTURE_FILE).read_text())
    except (OSError, UnicodeDecodeError) as error:
        raise _NotAState(f"{_STRUCTURE_FILE} is missing or unreadable ({error})") from None
    except (ValueError, RecursionError) as error:
        raise _NotAState(f"{_STRUCTURE_FILE} is not valid JSON ({str(error)[:200]})") from None
    if not isinstance(saved, dict) or set(saved) != {"step", "state"} or type(saved["step"]) is not int:
        raise _NotAState(f"{_STRUCTURE_FILE} does not hold a step number and a state")
    step = saved["step"]
    named = _step_of(folder)
    if step != marked or (named is not None and step != named):
        raise _NotAState(
            f"{_STRUCTURE_FILE} says step {step}, its marker step {marked}"
            + (f" and its name step {named}" if named is not None else "")
        )
    try:
        tensors = load_file(str(folder / _TENSORS_FILE))
    except (SafetensorError, OSError, ValueError) as error:
        raise _NotAState(f"{_TENSORS_FILE} is missing or unreadable ({error})") from None
    try:
        state = unflatten_state(tensors, saved["state"])
    except ValueError as error:
        raise _NotAState(f"{_STRUCTURE_FILE} is malformed: {error}") from None
    if not isinstance(state, dict):
        raise _NotAState(f"{_STRUCTURE_FILE} holds a {type(state).__name__}, not a state dict")
    return step, state


def prune_states(state_root: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (the newest is never deleted), and every unmarked
    step folder older than the newest complete one: what a kill in the middle of a delete (marker already gone)
    or of a save left behind. A save being written now is newer than every complete checkpoint, so it is never
    touched, and neither is anything not named like a state folder."""
    root = Path(state_root)
    states = list_complete_states(root)
    for _, folder in states[: max(0, len(states) - max(keep, 1))]:
        # Remove the marker first: a kill mid-delete then leaves an ignored folder, not a broken "complete" one.
        (folder / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(folder)
    if states:
        complete = {folder for _, folder in states}
        for step, folder in _step_folders(root):
            if step < states[-1][0] and folder not in complete:
                shutil.rmtree(folder)
