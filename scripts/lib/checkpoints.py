"""Checkpoint files without pickle: final weights and resumable training state.

Two kinds of files live here:

* **Weights** (`save_weights` / `load_weights`): one `.safetensors` file whose header metadata holds the
  JSON the other commands need to rebuild the model from the file alone (kind, config, class names...).
  A `.pt` path writes a plain tensor state dict (loadable with `torch.load(weights_only=True)`) with the
  same metadata in a `<file>.json` sidecar, for users whose tools want `.pt`.
* **Training state** (`save_training_state` / `load_training_state`): a folder `state/step_0001000/` with
  every component's state dict flattened to `state.safetensors` (tensors) + `state.json` (structure and
  scalars). It is written to a temporary folder, renamed into place and only then marked complete by a
  `COMPLETE` file, so a kill at any moment leaves either a complete checkpoint or one that is ignored.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from scripts.lib.cli import UserError

FORMAT_NAME = "tiny-cats"
FORMAT_VERSION = 1
STATE_DIR_PREFIX = "step_"
COMPLETE_MARKER = "COMPLETE"
_TENSORS_FILE = "state.safetensors"
_STRUCTURE_FILE = "state.json"


# ---------------------------------------------------------------------------------------------------------
# Weights files
# ---------------------------------------------------------------------------------------------------------
def _contiguous_cpu(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; clone so tied/sliced weights save cleanly.
    return {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state_dict.items()}


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write weights + JSON-able metadata atomically (temp file, then rename). Returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    full_metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **metadata}
    tmp = path.with_name(path.name + ".tmp")
    if path.suffix == ".pt":
        torch.save(_contiguous_cpu(state_dict), tmp)
        _write_json_atomic(metadata_sidecar(path), full_metadata)
    else:
        header = {key: json.dumps(value) for key, value in full_metadata.items()}
        save_file(_contiguous_cpu(state_dict), str(tmp), metadata=header)
    os.replace(tmp, path)
    return path


def metadata_sidecar(path: Path) -> Path:
    """Where the metadata of a `.pt` weights file lives."""
    return path.with_name(path.name + ".json")


def load_weights(path: str | Path, check_metadata: Callable[[dict[str, Any]], None] | None = None,
                 ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load (state_dict, metadata) from a `.safetensors` or `.pt` file, refusing anything unsafe.

    Raises UserError with the reason for: missing file, truncated/corrupt file, unknown format, missing
    metadata, and a `.pt` pickle that holds more than tensors (refused by `weights_only=True`, never run).
    `check_metadata` (it raises UserError) sees the metadata before a single tensor is read, so a file whose
    header is refused costs no more than reading that header.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} — train first (make train / make train-dit) or pass "
                        "--checkpoint with the path of an existing file")
    if path.suffix not in (".pt", ".safetensors"):
        raise UserError(f"{path}: unknown checkpoint format '{path.suffix}' — expected .safetensors or .pt")
    metadata = _read_sidecar(path) if path.suffix == ".pt" else _read_header(path)
    if check_metadata is not None:
        check_metadata(metadata)
    return (_load_pt(path) if path.suffix == ".pt" else _load_safetensors(path)), metadata


def _unreadable_safetensors(path: Path, error: Exception) -> UserError:
    return UserError(f"{path}: not a readable safetensors file ({error}) — the file is truncated or corrupt; use "
                     "an earlier checkpoint or retrain")


def _read_header(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise _unreadable_safetensors(path, error) from error
    if header.get("format") != json.dumps(FORMAT_NAME):
        raise UserError(f"{path}: no tiny-cats metadata in this file — it was not written by this kit, so the "
                        "model cannot be rebuilt from it")
    return {key: _parse_json(value, path) for key, value in header.items()}


def _parse_json(text: str, source: Path) -> Any:
    # ValueError covers JSONDecodeError and integers of more than 4300 digits; RecursionError, arrays nested
    # thousands deep. Both are what a hand-made or damaged header can hold.
    try:
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        raise UserError(f"{source}: corrupt metadata ({str(error)[:200]})") from None


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as error:
        raise _unreadable_safetensors(path, error) from error


def _read_sidecar(path: Path) -> dict[str, Any]:
    sidecar = metadata_sidecar(path)
    if not sidecar.is_file():
        raise UserError(f"{path}: metadata file {sidecar.name} is missing — the model cannot be rebuilt "
                        "without it (it is written next to every .pt this kit saves)")
    try:
        text = sidecar.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{sidecar}: unreadable metadata ({error})") from error
    metadata = _parse_json(text, sidecar)
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise UserError(f"{sidecar}: not tiny-cats metadata")
    return metadata


def _load_pt(path: Path) -> dict[str, torch.Tensor]:
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(f"{path}: refused — the file holds Python objects other than tensors, and loading it "
                        "could run code. Only plain tensor state dicts are accepted") from error
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as error:
        raise UserError(f"{path}: not a readable .pt file ({error}) — truncated or corrupt") from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{path}: expected a plain state dict of tensors")
    return state_dict


def _write_json_atomic(path: Path, data: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=2, sort_keys=True))
    os.replace(tmp, path)


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
            return {"__tensor__": path}
        if isinstance(value, dict):
            return {"__dict__": [[key, encode(item, f"{path}.{key}")] for key, item in value.items()]}
        if isinstance(value, tuple):
            return {"__tuple__": [encode(item, f"{path}.{i}") for i, item in enumerate(value)]}
        if isinstance(value, list):
            return [encode(item, f"{path}.{i}") for i, item in enumerate(value)]
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise TypeError(f"cannot store {type(value).__name__} at {path} in a checkpoint")

    return tensors, encode(state, "state")


def unflatten_state(tensors: dict[str, torch.Tensor], structure: Any) -> Any:
    """Inverse of `flatten_state`."""
    if isinstance(structure, list):
        return [unflatten_state(tensors, item) for item in structure]
    if isinstance(structure, dict):
        if "__tensor__" in structure:
            return tensors[structure["__tensor__"]]
        if "__tuple__" in structure:
            return tuple(unflatten_state(tensors, item) for item in structure["__tuple__"])
        return {key: unflatten_state(tensors, item) for key, item in structure["__dict__"]}
    return structure


# ---------------------------------------------------------------------------------------------------------
# Training state folders
# ---------------------------------------------------------------------------------------------------------
def state_dir_name(step: int) -> str:
    return f"{STATE_DIR_PREFIX}{step:07d}"


def _step_of(folder: Path) -> int | None:
    suffix = folder.name[len(STATE_DIR_PREFIX):]
    if not folder.name.startswith(STATE_DIR_PREFIX) or not suffix.isdigit():
        return None
    return int(suffix)


def list_complete_states(state_root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint, oldest first. Foreign or partial folders are ignored."""
    root = Path(state_root)
    if not root.is_dir():
        return []
    found = []
    for folder in root.iterdir():
        step = _step_of(folder)
        if step is not None and folder.is_dir() and (folder / COMPLETE_MARKER).is_file():
            found.append((step, folder))
    return sorted(found)


def find_resume_state(resume: str, state_root: str | Path) -> Path | None:
    """The state folder a run continues from, or None for a fresh start.

    `resume` is the trainers' --resume: "auto" (the newest complete state, if any), "never" (refused when
    the run already has states, so two runs never mix in one folder) or the path of a state folder.
    """
    states = list_complete_states(state_root)
    if resume == "never":
        if states:
            raise UserError(f"run {Path(state_root).parent} already has checkpoints (newest step {states[-1][0]}); "
                            "--resume never would mix two runs there — pick another --run-name, or use "
                            "--resume auto to continue it")
        return None
    if resume == "auto":
        return states[-1][1] if states else None
    return Path(resume)


def remove_unfinished_writes(state_root: str | Path) -> int:
    """Delete the temp folders of state writes a killed run left behind (each is a whole state's size)."""
    root = Path(state_root)
    leftovers = list(root.glob(".tmp-*")) if root.is_dir() else []
    for folder in leftovers:
        shutil.rmtree(folder)
    return len(leftovers)


def save_training_state(state_root: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Write `state` (nested, see flatten_state) to `state_root/step_N/` atomically and mark it complete."""
    root = Path(state_root)
    root.mkdir(parents=True, exist_ok=True)
    final = root / state_dir_name(step)
    tmp = root / f".tmp-{state_dir_name(step)}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    tensors, structure = flatten_state(state)
    save_file(tensors, str(tmp / _TENSORS_FILE))
    (tmp / _STRUCTURE_FILE).write_text(json.dumps({"step": step, "state": structure}))
    _fsync_tree(tmp)
    if final.exists():  # an incomplete leftover of a killed run at the same step
        shutil.rmtree(final)
    os.replace(tmp, final)
    (final / COMPLETE_MARKER).write_text(f"{step}\n")
    _fsync_tree(final)
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


def load_training_state(folder: str | Path) -> tuple[int, dict[str, Any]]:
    """Read a complete state folder: (step, state). UserError if it is not a complete checkpoint."""
    folder = Path(folder)
    if not (folder / COMPLETE_MARKER).is_file():
        raise UserError(f"{folder} is not a complete training-state checkpoint (no {COMPLETE_MARKER} marker) — "
                        "pass a folder like <run>/state/step_0010000 or use --resume auto")
    try:
        tensors = load_file(str(folder / _TENSORS_FILE))
        saved = json.loads((folder / _STRUCTURE_FILE).read_text())
    except (SafetensorError, OSError, ValueError) as error:
        raise UserError(f"{folder}: unreadable training state ({error})") from error
    return saved["step"], unflatten_state(tensors, saved["state"])


def prune_states(state_root: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (the newest is never deleted)."""
    states = list_complete_states(state_root)
    for _, folder in states[: max(0, len(states) - max(keep, 1))]:
        # Remove the marker first: a kill mid-delete then leaves an ignored folder, not a broken "complete" one.
        (folder / COMPLETE_MARKER).unlink(missing_ok=True)
        shutil.rmtree(folder)
