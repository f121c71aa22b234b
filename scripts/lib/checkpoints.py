"""Weights files and resumable training states, without pickle, validated before anything is built."""

from __future__ import annotations

import contextlib
import json
import math
import os
import pickle
import reprlib
import shutil
import zipfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from models.diffusion import DDPM, OBJECTIVES, FlowMatching, build_objective
from models.ema import EMA
from models.tiny_dit import DIT_SIZES, TinyDiT, build_dit
from scripts.lib.cli import UserError, printable, write_failure, write_atomic
from scripts.lib.data import MAX_CLASSES, class_name_problem

# ====================================================================================================
# Weights files without pickle: one `.safetensors` file whose header metadata holds the JSON the other
# ====================================================================================================


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
            write_atomic(metadata_sidecar(path), json.dumps(full_metadata, indent=2, sort_keys=True))
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


# ====================================================================================================
# The one place that knows what a tiny-cats weights file holds and how to rebuild its model.
# ====================================================================================================


DIT_KIND = "dit"


CLASSIFIER_KIND = "classifier"


IMAGENET_MEAN = (0.485, 0.456, 0.406)


IMAGENET_STD = (0.229, 0.224, 0.225)


PIXEL_RANGE = [-1.0, 1.0]  # what a DiT's pixels span: x = 2 * unit - 1


def dit_metadata(
    cfg_dict: dict[str, Any],
    *,
    model_name: str,
    image_size: int,
    in_channels: int,
    class_names: list[str],
    objective_name: str,
    objective_options: dict[str, Any],
    step: int,
    weights: str,
) -> dict[str, Any]:
    """Metadata of a DiT weights file. `weights` is "ema" or "raw". Pixels: x in [-1, 1] = 2 * unit - 1."""
    return {
        "kind": DIT_KIND,
        "model": model_name,
        "image_size": image_size,
        "in_channels": in_channels,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "objective": objective_name,
        "objective_options": dict(objective_options),
        "step": step,
        "weights": weights,
        "pixel_range": list(PIXEL_RANGE),
        "config": cfg_dict,
    }


def classifier_metadata(
    cfg_dict: dict[str, Any],
    *,
    backbone: str,
    image_size: int,
    class_names: list[str],
    metrics: dict[str, Any],
    epoch: int,
) -> dict[str, Any]:
    """Metadata of a classifier weights file: inputs are unit images normalised with ImageNet mean/std."""
    return {
        "kind": CLASSIFIER_KIND,
        "backbone": backbone,
        "image_size": image_size,
        "num_classes": len(class_names),
        "class_names": list(class_names),
        "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "metrics": metrics,
        "epoch": epoch,
        "config": cfg_dict,
    }


# ---------------------------------------------------------------------------------------------------------
# Validating metadata: every load path runs this before anything is built, so a hostile or damaged header
# costs milliseconds instead of the gigabytes its numbers would ask for, and ends in one line naming the field.
# ---------------------------------------------------------------------------------------------------------
# 8x the kit's 64 px default and the DiT paper's largest resolution. The biggest model it admits, B/2 at
# 512 px, has a 256 x 256 token grid whose position table is 0.2 GB; classifier backbones train at 224-384.
MAX_IMAGE_SIZE = 512


# The classifier trainer's minimum (train.py): the backbones' five stride-2 stages need at least this much.
MIN_CLASSIFIER_IMAGE_SIZE = 16


# Grey, RGB or RGBA: the kit itself trains on 3 channels.
MAX_IN_CHANNELS = 4


# DDPM uses 1000 steps and iDDPM 4000; the schedule and the ONNX sidecar's table grow with this.
MAX_TIMESTEPS = 10_000


# Normalised unit-range pixels divided by less than this would reach the thousands (and inf as it nears 0),
# which no trained network has seen; ImageNet's std is ~0.22.
MIN_NORMALIZATION_STD = 1e-3


# A classifier writes 8 metrics per epoch; verify prints them all, so a file may not bring thousands.
MAX_METRICS = 32


DIT_WEIGHTS = ("ema", "raw")


def _short_repr() -> reprlib.Repr:
    """repr() cut to a few dozen characters (it also escapes control characters): a header may hold anything."""
    short = reprlib.Repr()  # keyword arguments arrived only in Python 3.12
    short.maxlevel, short.maxlist, short.maxdict, short.maxstring, short.maxother, short.maxlong = 2, 4, 4, 60, 60, 40
    return short


_SHOWN = _short_repr()


class _Invalid(Exception):
    """One bad metadata value: the field it sits in, the value and why it is refused."""

    def __init__(self, field: str, value: Any, reason: str):
        super().__init__(field, value, reason)
        self.field, self.value, self.reason = field, value, reason


def _is_int(value: Any) -> bool:
    return type(value) is int  # JSON true/false are bools, and 32.0 or "32" are not sizes


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def _int_in(field: str, value: Any, low: int, high: int | None = None) -> int:
    if not _is_int(value):
        raise _Invalid(field, value, f"is a {type(value).__name__}, not an integer")
    if value < low or (high is not None and value > high):
        bound = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _Invalid(field, value, f"must be {bound}")
    return value


def _number_in(field: str, value: Any, low: float, high: float) -> float:
    if not _is_number(value) or not math.isfinite(value):
        raise _Invalid(field, value, "is not a finite number")
    if not low <= value <= high:
        raise _Invalid(field, value, f"must be between {low:g} and {high:g}")
    return value


def _one_of(field: str, value: Any, choices: Iterable[str]) -> str:
    choices = list(choices)
    if not isinstance(value, str) or value not in choices:
        raise _Invalid(field, value, f"is not one of {', '.join(choices)}")
    return value


def _mapping(field: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise _Invalid(field, value, f"is a {type(value).__name__}, not a JSON object")
    return value


def _check_class_names(value: Any) -> list[str]:
    if not isinstance(value, list):
        raise _Invalid("class_names", value, f"is a {type(value).__name__}, not a list of names")
    if not 1 <= len(value) <= MAX_CLASSES:
        raise _Invalid("class_names", value, f"must hold 1 to {MAX_CLASSES} names, not {len(value)}")
    seen: set[str] = set()
    for index, name in enumerate(value):
        problem = class_name_problem(name)
        if problem:
            raise _Invalid(f"class_names[{index}]", name, problem)
        if name in seen:
            raise _Invalid(f"class_names[{index}]", name, "appears twice")
        seen.add(name)
    return value


def _check_num_classes(metadata: dict[str, Any], minimum: int, why_minimum: str) -> None:
    num_classes = metadata["num_classes"]
    if _is_int(num_classes) and num_classes < minimum:
        raise _Invalid("num_classes", num_classes, f"must be at least {minimum} ({why_minimum})")
    _int_in("num_classes", num_classes, 1, MAX_CLASSES)
    names = _check_class_names(metadata["class_names"])
    if len(names) != num_classes:
        raise _Invalid("class_names", names, f"names {len(names)} classes but num_classes says {num_classes}")


def _check_objective(metadata: dict[str, Any]) -> None:
    objective = _one_of("objective", metadata["objective"], OBJECTIVES)
    options = _mapping("objective_options", metadata.get("objective_options", {}))
    allowed = {"flow": ("time_sampling",), "ddpm": ("schedule", "num_timesteps", "eta")}[objective]
    unknown = sorted(set(options) - set(allowed))
    if unknown:
        raise _Invalid(
            f"objective_options.{unknown[0]}",
            options[unknown[0]],
            f"is not an option of the {objective} objective ({', '.join(allowed)})",
        )
    if "time_sampling" in options:
        _one_of("objective_options.time_sampling", options["time_sampling"], FlowMatching.time_samplings)
    if "schedule" in options:
        _one_of("objective_options.schedule", options["schedule"], DDPM.schedules)
    if "num_timesteps" in options:
        _int_in("objective_options.num_timesteps", options["num_timesteps"], 2, MAX_TIMESTEPS)
    if "eta" in options:
        _number_in("objective_options.eta", options["eta"], 0.0, 1.0)


def _check_normalization(value: Any) -> None:
    normalization = _mapping("normalization", value)
    for key, low in (("mean", 0.0), ("std", MIN_NORMALIZATION_STD)):
        values = normalization.get(key)
        if not isinstance(values, list) or len(values) != 3:
            raise _Invalid(f"normalization.{key}", values, "must be a list of 3 numbers (R, G, B)")
        for channel, number in enumerate(values):
            _number_in(f"normalization.{key}[{channel}]", number, low, 1.0)


def _check_metrics(value: Any) -> None:
    metrics = _mapping("metrics", value)
    if len(metrics) > MAX_METRICS:
        raise _Invalid("metrics", metrics, f"holds {len(metrics)} entries, more than {MAX_METRICS}")
    for key, number in metrics.items():
        problem = class_name_problem(key)  # a metric is named like a class: short, one printable line
        if problem:
            raise _Invalid("metrics", key, f"has a name that {problem}")
        if number is not None and not _is_number(number):
            raise _Invalid(f"metrics.{key}", number, "is not a number")


def _check_config(value: Any) -> None:
    """The training config: a JSON object; the few entries the commands read must have usable values."""
    config = _mapping("config", value)
    if config.get("cfg_scale") is not None:  # verify/export sample with the guidance the DiT trained for
        _number_in("config.cfg_scale", config["cfg_scale"], 0.0, math.inf)
    if config.get("val_split") is not None:  # evaluate re-creates the classifier's validation split
        _number_in("config.val_split", config["val_split"], 0.0, 1.0)
    if config.get("seed") is not None and not _is_int(config["seed"]):
        raise _Invalid("config.seed", config["seed"], "is not an integer")
    if config.get("data_dir") is not None and not isinstance(config["data_dir"], str):
        raise _Invalid("config.data_dir", config["data_dir"], "is not a path")


def _check_dit(metadata: dict[str, Any]) -> None:
    model = _one_of("model", metadata["model"], DIT_SIZES)
    patch = DIT_SIZES[model].patch
    image_size = _int_in("image_size", metadata["image_size"], patch, MAX_IMAGE_SIZE)
    if image_size % patch:
        raise _Invalid("image_size", image_size, f"is not a multiple of the patch size {patch} of {model}")
    _int_in("in_channels", metadata["in_channels"], 1, MAX_IN_CHANNELS)
    _check_num_classes(metadata, 1, "the DiT needs one class besides its null class")
    _check_objective(metadata)
    _int_in("step", metadata["step"], 0)
    _one_of("weights", metadata["weights"], DIT_WEIGHTS)
    if "pixel_range" in metadata and metadata["pixel_range"] != PIXEL_RANGE:
        raise _Invalid("pixel_range", metadata["pixel_range"], f"is not {PIXEL_RANGE}, the DiT's pixel range")


def _check_classifier(metadata: dict[str, Any]) -> None:
    from models.classifier import BACKBONES  # torchvision: imported only where a classifier is loaded

    _one_of("backbone", metadata["backbone"], BACKBONES)
    _int_in("image_size", metadata["image_size"], MIN_CLASSIFIER_IMAGE_SIZE, MAX_IMAGE_SIZE)
    _check_num_classes(metadata, 2, "a one-class classifier predicts that class for anything")
    _check_normalization(metadata["normalization"])
    _check_metrics(metadata["metrics"])
    _int_in("epoch", metadata["epoch"], 0)


# kind -> (the fields every file of that kind carries, their check)
_KINDS: dict[str, tuple[tuple[str, ...], Callable[[dict[str, Any]], None]]] = {
    DIT_KIND: (
        ("model", "image_size", "in_channels", "num_classes", "class_names", "objective", "step", "weights", "config"),
        _check_dit,
    ),
    CLASSIFIER_KIND: (
        ("backbone", "image_size", "num_classes", "class_names", "normalization", "metrics", "epoch", "config"),
        _check_classifier,
    ),
}


def validate_metadata(metadata: Any, kind: str | None = None, source: Path | str = "checkpoint") -> None:
    """Refuse metadata that does not describe a model this kit can rebuild: every value is checked for type
    and range (sizes within the bounds above), and contradictions between values are refused. `kind`, when
    given, is the kind the caller needs. Raises one UserError line naming the field and its value."""
    found = metadata.get("kind") if isinstance(metadata, dict) else None
    if found not in _KINDS:
        raise UserError(
            f"{source}: unknown checkpoint kind {_SHOWN.repr(found)} (expected "
            f"'{DIT_KIND}' or '{CLASSIFIER_KIND}') — it was not written by this kit"
        )
    if kind is not None and found != kind:
        raise UserError(f"{source}: this is a '{found}' checkpoint, not a '{kind}' one")
    required, check = _KINDS[found]
    missing = [key for key in required if key not in metadata]
    if missing:
        raise UserError(f"{source}: metadata lacks {', '.join(missing)} — the model cannot be rebuilt")
    try:
        check(metadata)
        _check_config(metadata["config"])
    except _Invalid as bad:
        raise UserError(
            f"{source}: metadata {bad.field} = {_SHOWN.repr(bad.value)} {bad.reason} — the file is "
            "damaged or was not written by this kit; use the file a trainer wrote"
        ) from None


def build_dit_from_metadata(metadata: dict[str, Any]) -> TinyDiT:
    """An untrained TinyDiT with the architecture the metadata describes."""
    validate_metadata(metadata, DIT_KIND)
    return build_dit(metadata["model"], metadata["image_size"], metadata["num_classes"], metadata["in_channels"])


def build_objective_from_metadata(metadata: dict[str, Any]):
    validate_metadata(metadata, DIT_KIND)
    return build_objective(metadata["objective"], **metadata.get("objective_options", {}))


def build_classifier_from_metadata(metadata: dict[str, Any]) -> nn.Module:
    from models.classifier import build_classifier

    validate_metadata(metadata, CLASSIFIER_KIND)
    return build_classifier(metadata["backbone"], metadata["num_classes"], pretrained=False)


def load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path | str) -> None:
    """Load every tensor, refusing missing, unexpected or mis-shaped ones with a readable reason."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [
        f"{name} {tuple(state_dict[name].shape)} != {tuple(tensor.shape)}"
        for name, tensor in expected.items()
        if name in state_dict and state_dict[name].shape != tensor.shape
    ]
    problems = []
    if missing:
        problems.append(f"missing {len(missing)} tensors (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected tensors (e.g. {', '.join(unexpected[:3])})")
    if mismatched:
        problems.append(f"shape mismatch: {'; '.join(mismatched[:3])}")
    if problems:
        raise UserError(f"{path}: weights do not match the model in its metadata — {'; '.join(problems)}")
    model.load_state_dict(state_dict, strict=True)


def load_dit(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, objective, metadata) from a DiT weights file."""
    state_dict, metadata = load_weights(path, check_metadata=lambda found: validate_metadata(found, DIT_KIND, path))
    model = build_dit_from_metadata(metadata)
    load_strict(model, state_dict, path)
    return model.to(device).eval(), build_objective_from_metadata(metadata), metadata


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, metadata) from a classifier weights file."""
    state_dict, metadata = load_weights(
        path, check_metadata=lambda found: validate_metadata(found, CLASSIFIER_KIND, path)
    )
    model = build_classifier_from_metadata(metadata)
    load_strict(model, state_dict, path)
    return model.to(device).eval(), metadata


def save_model(path: str | Path, model: nn.Module, metadata: dict[str, Any]) -> Path:
    """Weights of an unwrapped model (no DDP/compile prefixes) + metadata from dit_/classifier_metadata."""
    return save_weights(path, model.state_dict(), metadata)


def classifier_normalize(images_unit: torch.Tensor, metadata: dict[str, Any] | None = None) -> torch.Tensor:
    """Unit-range images (B,3,H,W) -> the normalised input the classifier was trained on."""
    norm = (metadata or {}).get("normalization", {"mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    mean = torch.tensor(norm["mean"], device=images_unit.device, dtype=images_unit.dtype).view(1, -1, 1, 1)
    std = torch.tensor(norm["std"], device=images_unit.device, dtype=images_unit.dtype).view(1, -1, 1, 1)
    return (images_unit - mean) / std


def unit_to_dit(images_unit: torch.Tensor) -> torch.Tensor:
    return images_unit * 2 - 1


def dit_to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) / 2).clamp(0, 1)


# ====================================================================================================
# Resumable training state without pickle: a folder `state/step_0001000/` with every component's state dict
# ====================================================================================================


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
        write_atomic(final / COMPLETE_MARKER, f"{step}\n")
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


# ====================================================================================================
# The checkpointed state of a training run, and the rules for loading one into a run.
# ====================================================================================================


@dataclass
class TrainingState:
    """What a checkpoint holds and restores: the weights and optimizer moments, and, where a trainer has them,
    its EMA weights and fp16 loss scale. A trainer adds its own JSON-able record (step, epoch...) when saving."""

    model: nn.Module  # the plain module (no DDP / compile wrapper)
    optimizer: Any  # the (prepared) optimizer
    ema: EMA | None = None
    scaler: Any = None  # Accelerate's fp16 gradient scaler, if any

    def state_dict(self, **record: Any) -> dict[str, Any]:
        state = {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), **record}
        if self.ema is not None:
            state["ema"] = self.ema.state_dict()
        if self.scaler is not None:
            state["scaler"] = self.scaler.state_dict()
        return state

    def load(self, state: dict[str, Any], folder: Path) -> None:
        """Restore from a checkpoint's state; one UserError if it does not fit (missing parts, wrong shapes)."""
        try:
            self.model.load_state_dict(state["model"])
            load_optimizer_state(self.optimizer, state["optimizer"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            if self.scaler is not None and "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UserError(
                f"{folder} does not hold a training state this run can load ({reason}) — use the "
                "same flags and data as the run that saved it, or a new --run-name"
            ) from error


def load_optimizer_state(optimizer, state: dict[str, Any]) -> None:
    """Restore an optimizer from a checkpoint, each moment tensor in its parameter's memory layout.

    Checkpoints store tensors contiguous, so a channels-last parameter's Adam moments come back in NCHW order;
    the fused AdamW kernel walks parameter, gradient and moments as flat memory and then silently pairs wrong
    elements (measured: a resumed classifier diverged from the uninterrupted run at its first step).
    """
    optimizer.load_state_dict(state)
    inner = getattr(optimizer, "optimizer", optimizer)
    for group in inner.param_groups:
        for param in group["params"]:
            moments = inner.state.get(param, {})
            for key, value in moments.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    moments[key] = torch.empty_like(param).copy_(value)


def check_same_setup(folder: Path, saved: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Refuse to continue a checkpoint into a model it was not trained as (one line listing the differences)."""
    differences = [
        f"{key} {saved.get(key, '(not recorded)')} -> {value}"
        for key, value in wanted.items()
        if saved.get(key) != value
    ]
    if differences:
        raise UserError(
            f"{folder} was trained with a different setup ({'; '.join(differences)}) — use the same "
            "flags and data to continue it, or a new --run-name to start another run"
        )


# ====================================================================================================
# The non-finite guard: no NaN/inf loss, gradient or weight ever reaches a checkpoint.
# ====================================================================================================


def non_finite_names(tensors: Mapping[str, torch.Tensor]) -> list[str]:
    """Names of the floating-point tensors that hold NaN or inf (for the check before a save)."""
    names = [name for name, tensor in tensors.items() if tensor.is_floating_point()]
    if not names:
        return []
    finite = torch.stack([torch.isfinite(tensors[name]).all() for name in names]).tolist()
    return [name for name, ok in zip(names, finite, strict=True) if not ok]
