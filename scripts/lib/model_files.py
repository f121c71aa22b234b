"""The one place that knows what a tiny-cats weights file holds and how to rebuild its model.

Every final checkpoint carries JSON metadata (see `dit_metadata` / `classifier_metadata`) so that
sample, verify, export, predict and evaluate rebuild the exact model from the file alone. Loading is
strict: a file whose tensors do not match the architecture its metadata names is refused, never
"loaded" half-way into a different model.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.diffusion import DDPM, OBJECTIVES, FlowMatching, build_objective
from models.tiny_dit import DIT_SIZES, TinyDiT, build_dit
from scripts.lib.weights import load_weights, save_weights
from scripts.lib.cli import UserError
from scripts.lib.images import MAX_CLASSES, class_name_problem

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
