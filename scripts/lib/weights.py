"""Weights files without pickle: one `.safetensors` file whose header metadata holds the JSON the other
commands need to rebuild the model from the file alone (kind, config, class names...). A `.pt` path writes a
plain tensor state dict (loadable with `torch.load(weights_only=True)`) with the same metadata in a
`<file>.json` sidecar, for users whose tools want `.pt`. The header (or sidecar) is read and may be checked
before any tensor is, so a refused file costs nothing.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file

from scripts.lib.cli import UserError
from scripts.lib.files import write_failure, write_text_atomic

FORMAT_NAME = "tiny-cats"
FORMAT_VERSION = 1


# ---------------------------------------------------------------------------------------------------------
# Weights files
# ---------------------------------------------------------------------------------------------------------
def _contiguous_cpu(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # safetensors refuses shared or non-contiguous storage; clone so tied/sliced weights save cleanly.
    return {name: tensor.detach().to("cpu").contiguous().clone() for name, tensor in state_dict.items()}


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write weights + JSON-able metadata atomically (temp file, then rename). Returns the path.

    A write that fails (disk full, no permission) removes its temp file, leaves an earlier file at `path` as it
    was and raises one UserError line that says what failed and what to do.
    """
    path = Path(path)
    full_metadata = {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **metadata}
    tensors = _contiguous_cpu(state_dict)
    tmp = path.with_name(path.name + ".tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".pt":
            _torch_save(tensors, tmp)
            write_text_atomic(metadata_sidecar(path), json.dumps(full_metadata, indent=2, sort_keys=True))
        else:
            header = {key: json.dumps(value) for key, value in full_metadata.items()}
            save_file(tensors, str(tmp), metadata=header)
        os.replace(tmp, path)
    except (OSError, SafetensorError) as error:
        with contextlib.suppress(OSError):
            tmp.unlink(missing_ok=True)
        raise write_failure("the weights", path, error) from error
    return path


def _torch_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        torch.save(tensors, path)
    except RuntimeError as error:  # torch's zip writer reports a failed write (a full disk) only as this
        raise OSError(f"the write failed ({str(error)[:200]})") from error


def metadata_sidecar(path: Path) -> Path:
    """Where the metadata of a `.pt` weights file lives."""
    return path.with_name(path.name + ".json")


def load_weights(
    path: str | Path,
    check_metadata: Callable[[dict[str, Any]], None] | None = None,
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Load (state_dict, metadata) from a `.safetensors` or `.pt` file, refusing anything unsafe.

    Raises UserError with the reason for: missing file, truncated/corrupt file, unknown format, missing
    metadata, and a `.pt` pickle that holds more than tensors (refused by `weights_only=True`, never run).
    `check_metadata` (it raises UserError) sees the metadata before a single tensor is read, so a file whose
    header is refused costs no more than reading that header.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(
            f"checkpoint not found: {path} — train first (make train / make train-dit) or pass "
            "--checkpoint with the path of an existing file"
        )
    if path.suffix not in (".pt", ".safetensors"):
        raise UserError(f"{path}: unknown checkpoint format '{path.suffix}' — expected .safetensors or .pt")
    metadata = _read_sidecar(path) if path.suffix == ".pt" else _read_header(path)
    if check_metadata is not None:
        check_metadata(metadata)
    return (_load_pt(path) if path.suffix == ".pt" else _load_safetensors(path)), metadata


def _unreadable_safetensors(path: Path, error: Exception) -> UserError:
    return UserError(
        f"{path}: not a readable safetensors file ({error}) — the file is truncated or corrupt; use "
        "an earlier checkpoint or retrain"
    )


def _read_header(path: Path) -> dict[str, Any]:
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise _unreadable_safetensors(path, error) from error
    if header.get("format") != json.dumps(FORMAT_NAME):
        raise UserError(
            f"{path}: no tiny-cats metadata in this file — it was not written by this kit, so the "
            "model cannot be rebuilt from it"
        )
    return {key: parse_json(value, path) for key, value in header.items()}


def parse_json(text: str, source: Path) -> Any:
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
        raise UserError(
            f"{path}: metadata file {sidecar.name} is missing — the model cannot be rebuilt "
            "without it (it is written next to every .pt this kit saves)"
        )
    try:
        text = sidecar.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise UserError(f"{sidecar}: unreadable metadata ({error})") from error
    metadata = parse_json(text, sidecar)
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
        raise UserError(f"{sidecar}: not tiny-cats metadata")
    return metadata


def _load_pt(path: Path) -> dict[str, torch.Tensor]:
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise UserError(
            f"{path}: refused — the file holds Python objects other than tensors, and loading it "
            "could run code. Only plain tensor state dicts are accepted"
        ) from error
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile) as error:
        raise UserError(f"{path}: not a readable .pt file ({error}) — truncated or corrupt") from error
    if not isinstance(state_dict, dict) or not all(isinstance(v, torch.Tensor) for v in state_dict.values()):
        raise UserError(f"{path}: expected a plain state dict of tensors")
    return state_dict
