"""Weights files and resumable training states, without pickle.

Weights: one `.safetensors` file whose header holds JSON metadata (kind, architecture, classes, training config), from
which every command rebuilds the model; a `.pt` path writes a plain tensor state dict (for `torch.load(weights_only=
True)`) with the metadata in a `<file>.json` sidecar. Metadata is checked against a table of fields, types and bounds
before a model is built or a tensor read, and tensors against the model (keys, shapes, dtypes, finite) before it gets
them: a hostile or damaged file costs milliseconds and ends in one line naming the field or the tensor.

States: `state/step_0001000/` holds `state.safetensors` (the tensors), `state.json` (structure and scalars) and a
`COMPLETE` marker naming the step. It is written to a temporary folder, renamed, then marked, so a kill at any moment
leaves a complete checkpoint or one that is ignored; anything this module did not write is refused with one line.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import reprlib
import shutil
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import load_file, safe_open, save_file
from torch import nn

from models.diffusion import DDPM, OBJECTIVES, FlowMatching, build_objective
from models.tiny_dit import DIT_SIZES, TinyDiT, build_dit
from scripts.lib.cli import FILE_MODE, UserError, class_names_problem, name_problem, printable, write_atomic
from scripts.lib.cli import write_failure
from scripts.lib.data import MAX_CLASSES

FORMAT_NAME, FORMAT_VERSION = "tiny-cats", 1
DIT_KIND, CLASSIFIER_KIND = "dit", "classifier"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
PIXEL_RANGE = [-1.0, 1.0]  # a DiT's pixels: x = 2 * unit - 1
# Bounds of what a file may ask for. 512 px is 8x the kit's default and the DiT paper's largest resolution (B/2
# there has a 0.2 GB position table); classifiers train at 224-384. 16 px is the least the backbones' five
# stride-2 stages take. DDPM uses 1,000 timesteps, iDDPM 4,000. Normalised pixels divided by a std below 1e-3
# would reach values no network has seen. A classifier writes 8 metrics per epoch.
MAX_IMAGE_SIZE, MIN_CLASSIFIER_IMAGE_SIZE, MAX_IN_CHANNELS, MAX_TIMESTEPS, MAX_METRICS = 512, 16, 4, 10_000, 32
MIN_NORMALIZATION_STD = 1e-3


def dit_metadata(
    config: dict[str, Any], *, model_name: str, image_size: int, in_channels: int, class_names: list[str],
    objective_name: str, objective_options: dict[str, Any], step: int, weights: str,
) -> dict[str, Any]:  # fmt: skip
    """Metadata of a DiT weights file; `weights` is "ema" or "raw"."""
    return {
        "kind": DIT_KIND, "model": model_name, "image_size": image_size, "in_channels": in_channels,
        "num_classes": len(class_names), "class_names": list(class_names), "objective": objective_name,
        "objective_options": dict(objective_options), "step": step, "weights": weights,
        "pixel_range": list(PIXEL_RANGE), "config": config,
    }  # fmt: skip


def classifier_metadata(
    config: dict[str, Any], *, backbone: str, image_size: int, class_names: list[str], metrics: dict[str, Any],
    epoch: int,
) -> dict[str, Any]:  # fmt: skip
    """Metadata of a classifier weights file: inputs are unit images normalised with ImageNet mean/std."""
    return {
        "kind": CLASSIFIER_KIND, "backbone": backbone, "image_size": image_size, "num_classes": len(class_names),
        "class_names": list(class_names), "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
        "metrics": metrics, "epoch": epoch, "config": config,
    }  # fmt: skip


# --- Metadata: a table of fields, each with its check (None = fine, else why not) --------------------------------
def _integer(low: int, high: float = math.inf) -> Callable[[Any], str | None]:
    bound = f"from {low} to {high}" if high < math.inf else f"of at least {low}"
    return lambda v: None if type(v) is int and low <= v <= high else f"is not an integer {bound}"


def _number(low: float, high: float = math.inf) -> Callable[[Any], str | None]:
    ok = lambda v: type(v) in (int, float) and math.isfinite(v) and low <= v <= high  # noqa: E731
    return lambda v: None if ok(v) else f"is not a finite number from {low:g} to {high:g}"


def _one_of(choices) -> Callable[[Any], str | None]:
    return lambda v: None if isinstance(v, str) and v in choices else f"is not one of {', '.join(choices)}"


def _is(expected_type: type, what: str) -> Callable[[Any], str | None]:
    return lambda v: None if isinstance(v, expected_type) else f"is not {what}"


def _names(v: Any) -> str | None:
    if not isinstance(v, list) or not 1 <= len(v) <= MAX_CLASSES:
        return f"is not a list of 1 to {MAX_CLASSES} class names"
    return class_names_problem(v)


def _three(low: float) -> Callable[[Any], str | None]:
    number = _number(low, 1.0)
    ok = lambda v: isinstance(v, list) and len(v) == 3 and not any(map(number, v))  # noqa: E731
    return lambda v: None if ok(v) else f"is not a list of 3 numbers (R, G, B) from {low:g} to 1"


def _metrics(v: Any) -> str | None:
    if not isinstance(v, dict) or len(v) > MAX_METRICS:
        return f"is not an object of at most {MAX_METRICS} metrics"
    bad = next((k for k, x in v.items() if name_problem(k) or not (x is None or type(x) in (int, float))), None)
    return None if bad is None else f"has a metric {printable(bad)[:60]!r} that is not a plain name and a number"


_CONFIG = [  # (path, required, check): the training config entries the commands read
    ("config", True, _is(dict, "a JSON object")),
    ("config.cfg_scale", False, _number(0.0)),  # verify/export/sample guide with the DiT's training scale
    ("config.val_split", False, _number(0.0, 1.0)),  # evaluate re-creates the classifier's validation split
    ("config.seed", False, _integer(-(2**63))),
    ("config.data_dir", False, _is(str, "a path")),
]
FIELDS = {
    DIT_KIND: [
        ("model", True, _one_of(tuple(DIT_SIZES))),
        ("image_size", True, _integer(1, MAX_IMAGE_SIZE)),
        ("in_channels", True, _integer(1, MAX_IN_CHANNELS)),
        ("num_classes", True, _integer(1, MAX_CLASSES)),
        ("class_names", True, _names),
        ("objective", True, _one_of(OBJECTIVES)),
        ("objective_options", False, _is(dict, "a JSON object")),
        ("objective_options.time_sampling", False, _one_of(FlowMatching.time_samplings)),
        ("objective_options.schedule", False, _one_of(tuple(DDPM.schedules))),
        ("objective_options.num_timesteps", False, _integer(2, MAX_TIMESTEPS)),
        ("objective_options.eta", False, _number(0.0, 1.0)),
        ("step", True, _integer(0)),
        ("weights", True, _one_of(("ema", "raw"))),
        *_CONFIG,
    ],
    CLASSIFIER_KIND: [
        ("backbone", True, lambda v: _one_of(_backbones())(v)),
        ("image_size", True, _integer(MIN_CLASSIFIER_IMAGE_SIZE, MAX_IMAGE_SIZE)),
        ("num_classes", True, _integer(2, MAX_CLASSES)),  # a one-class classifier predicts that class for anything
        ("class_names", True, _names),
        ("normalization", True, _is(dict, "a JSON object")),
        ("normalization.mean", True, _three(0.0)),
        ("normalization.std", True, _three(MIN_NORMALIZATION_STD)),
        ("metrics", True, _metrics),
        ("epoch", True, _integer(0)),
        *_CONFIG,
    ],
}
OBJECTIVE_OPTIONS = {"flow": {"time_sampling"}, "ddpm": {"schedule", "num_timesteps", "eta"}}
_MISSING = object()


def _backbones() -> tuple[str, ...]:
    from models.classifier import BACKBONES  # torchvision: imported only where a classifier is loaded

    return BACKBONES


def _get(metadata: dict[str, Any], path: str) -> Any:
    value: Any = metadata
    for key in path.split("."):
        value = value.get(key, _MISSING) if isinstance(value, dict) else _MISSING
    return value


def _contradiction(kind: str, m: dict[str, Any]) -> tuple[str, Any, str] | None:
    """(field, value, why) for the first value that contradicts another, or None."""
    if kind == DIT_KIND and m["image_size"] % DIT_SIZES[m["model"]].patch:
        return "image_size", m["image_size"], f"is not a multiple of the patch size of {m['model']}"
    if len(m["class_names"]) != m["num_classes"]:
        return (
            "class_names",
            m["class_names"],
            f"names {len(m['class_names'])} classes but num_classes says {m['num_classes']}",
        )
    extra = kind == DIT_KIND and sorted(set(m.get("objective_options", {})) - OBJECTIVE_OPTIONS[m["objective"]])
    if extra:
        return f"objective_options.{extra[0]}", m["objective_options"][extra[0]], f"is no option of {m['objective']}"
    if kind == DIT_KIND and m.get("pixel_range", PIXEL_RANGE) != PIXEL_RANGE:
        return "pixel_range", m["pixel_range"], f"is not {PIXEL_RANGE}"
    for key in ("image_size", "model", "backbone", "objective"):  # a file whose config says otherwise is damaged
        if key in m and m["config"].get(key, m[key]) != m[key]:
            return f"config.{key}", m["config"][key], f"contradicts {key} = {m[key]!r}"
    return None


_SHOWN = reprlib.Repr()  # a header may hold anything: show a few dozen characters (keyword arguments are 3.12+)
_SHOWN.maxlevel, _SHOWN.maxlist, _SHOWN.maxdict, _SHOWN.maxstring, _SHOWN.maxother = 2, 4, 4, 60, 60


def validate_metadata(metadata: Any, kind: str | None = None, source: Path | str = "checkpoint") -> None:
    """Refuse metadata that does not describe a model this kit can rebuild (`kind`: the kind the caller needs), with
    one UserError line naming the field and its value."""
    found = metadata.get("kind") if isinstance(metadata, dict) else None
    if found not in FIELDS:
        raise UserError(f"{source}: unknown checkpoint kind {_SHOWN.repr(found)} — it was not written by this kit")
    if kind is not None and found != kind:
        raise UserError(f"{source}: this is a '{found}' checkpoint, not a '{kind}' one")
    missing = [path for path, required, _ in FIELDS[found] if required and _get(metadata, path) in (_MISSING, None)]
    if missing:
        raise UserError(f"{source}: metadata lacks {', '.join(missing)} — the model cannot be rebuilt")
    bad = next(
        ((path, value, why) for path, _, check in FIELDS[found]
         if (value := _get(metadata, path)) not in (_MISSING, None) and (why := check(value))),
        None,
    ) or _contradiction(found, metadata)  # fmt: skip
    if bad:
        raise UserError(
            f"{source}: metadata {bad[0]} = {printable(_SHOWN.repr(bad[1]))} {bad[2]} — the file is damaged or was "
            "not written by this kit; use the file a trainer wrote"
        )


def build_dit_from_metadata(metadata: dict[str, Any]) -> TinyDiT:
    validate_metadata(metadata, DIT_KIND)
    return build_dit(metadata["model"], metadata["image_size"], metadata["num_classes"], metadata["in_channels"])


def build_objective_from_metadata(metadata: dict[str, Any]):
    validate_metadata(metadata, DIT_KIND)
    return build_objective(metadata["objective"], **metadata.get("objective_options", {}))


def build_classifier_from_metadata(metadata: dict[str, Any]) -> nn.Module:
    from models.classifier import build_classifier

    validate_metadata(metadata, CLASSIFIER_KIND)
    return build_classifier(metadata["backbone"], metadata["num_classes"], pretrained=False)


# --- Weights files -----------------------------------------------------------------------------------------------
def broken_names(tensors: dict[str, torch.Tensor]) -> list[str]:
    """The float tensors holding NaN/inf or values so large that their fp32 norm overflows (the training guard's rule
    too), found with one read of the device."""
    names = [name for name, tensor in tensors.items() if tensor.is_floating_point()]
    norms = torch._foreach_norm([tensors[name].float() for name in names]) if names else []
    finite = torch.isfinite(torch.stack(norms)).tolist() if names else []
    return [name for name, ok in zip(names, finite, strict=True) if not ok]


def weight_problems(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """What keeps `state` from loading into a model whose state dict is `expected`: {check: offending tensors}."""
    common = [name for name in expected if name in state]
    # A float tensor may come in another float precision (fp16/bf16 exports); integer ones must match exactly.
    floats = {name for name in common if state[name].is_floating_point() and expected[name].is_floating_point()}
    return {
        "keys": [f"missing {n}" for n in expected if n not in state] + [f"extra {n}" for n in state.keys() - expected],
        "shapes": [f"{n} {tuple(state[n].shape)}, not {tuple(expected[n].shape)}" for n in common
                   if state[n].shape != expected[n].shape],
        "dtypes": [f"{n} {state[n].dtype}, not {expected[n].dtype}" for n in common
                   if state[n].dtype != expected[n].dtype and n not in floats],
        "finite": [f"{n} holds NaN/inf or overflows" for n in broken_names(state)],
    }  # fmt: skip


def load_strict(model: nn.Module, state: dict[str, torch.Tensor], path: Path | str) -> None:
    """Load every tensor, refusing missing, extra, mis-shaped, mis-typed or non-finite ones in one line."""
    problems = {check: found for check, found in weight_problems(state, model.state_dict()).items() if found}
    if problems:
        shown = "; ".join(
            f"{check}: {', '.join(found[:3])}{' ...' * (len(found) > 3)}" for check, found in problems.items()
        )
        raise UserError(f"{path}: refused — its weights do not fit the model its metadata describes ({shown})")
    model.load_state_dict(state, strict=True)


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], metadata: dict[str, Any]) -> Path:
    """Write weights + metadata atomically; refuses NaN/inf (nothing non-finite is ever written), and a failed write
    (disk full, no permission) leaves an earlier file as it was and raises one line."""
    path, metadata = Path(path), {"format": FORMAT_NAME, "format_version": FORMAT_VERSION, **metadata}
    tensors = {name: t.detach().to("cpu").contiguous().clone() for name, t in state_dict.items()}  # no shared storage
    broken = broken_names(tensors)
    if broken:
        raise UserError(f"not writing {path}: {len(broken)} tensors hold NaN/inf (e.g. {', '.join(broken[:3])})")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.suffix == ".pt":  # the sidecar is replaced only once the weights are written, just before them
            sidecar = json.dumps(metadata, indent=2, sort_keys=True)
            write_atomic(path, lambda tmp: (_torch_save(tensors, tmp), write_atomic(metadata_sidecar(path), sidecar)))
        else:
            header = {key: json.dumps(value) for key, value in metadata.items()}
            write_atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=header))
    except (OSError, SafetensorError) as error:
        raise write_failure("the weights", path, error) from error
    return path


def _torch_save(tensors: dict[str, torch.Tensor], path: Path) -> None:
    try:
        torch.save(tensors, path)
    except RuntimeError as error:  # torch's zip writer reports a failed write (a full disk) only as this
        raise OSError(f"the write failed ({str(error)[:200]})") from error


def save_model(path: str | Path, model: nn.Module, metadata: dict[str, Any]) -> Path:
    """Weights of an unwrapped model (no DDP/compile prefixes) with metadata from dit_/classifier_metadata."""
    return save_weights(path, model.state_dict(), metadata)


def metadata_sidecar(path: Path) -> Path:
    return path.with_name(path.name + ".json")


def _parse_json(text: str | bytes, source: Path) -> Any:
    try:  # ValueError: bad JSON, or integers of 4,300+ digits; RecursionError: arrays nested thousands deep
        return json.loads(text)
    except (ValueError, RecursionError) as error:
        raise UserError(f"{source}: corrupt metadata ({str(error)[:200]})") from None


def read_metadata(path: str | Path) -> dict[str, Any]:
    """The metadata of a weights file (header or sidecar), read without touching a tensor."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint not found: {path} — train first (make train / make train-dit) or pass its path")
    if path.suffix == ".pt":
        sidecar = metadata_sidecar(path)
        try:
            metadata = _parse_json(sidecar.read_bytes(), sidecar)
        except OSError as error:
            raise UserError(f"{path}: its metadata file {sidecar.name} is missing ({error.strerror})") from None
        if not isinstance(metadata, dict) or metadata.get("format") != FORMAT_NAME:
            _foreign(sidecar)
        return metadata
    if path.suffix != ".safetensors":
        raise UserError(f"{path}: unknown checkpoint format '{path.suffix}' — expected .safetensors or .pt")
    try:
        with safe_open(str(path), framework="pt") as handle:
            header = handle.metadata() or {}
    except (SafetensorError, OSError, ValueError) as error:
        raise _unreadable(path, error) from None
    if header.get("format") != json.dumps(FORMAT_NAME):
        _foreign(path)
    return {key: _parse_json(value, path) for key, value in header.items()}


def _foreign(path: Path):
    raise UserError(f"{path}: no tiny-cats metadata — it was not written by this kit, so the model cannot be rebuilt")


def _unreadable(path: Path, error: Exception) -> UserError:
    return UserError(f"{path}: not a readable weights file ({error}) — truncated or corrupt; use another checkpoint")


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a weights file; a `.pt` that holds anything but tensors is refused, never unpickled."""
    path, pt = Path(path), Path(path).suffix == ".pt"
    try:
        tensors = torch.load(path, map_location="cpu", weights_only=True) if pt else load_file(str(path))
    except pickle.UnpicklingError:
        raise UserError(f"{path}: refused — it holds Python objects besides tensors, which could run code") from None
    except (SafetensorError, RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as error:
        raise _unreadable(path, error) from None
    if not isinstance(tensors, dict) or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
        raise UserError(f"{path}: expected a plain state dict of tensors")
    return tensors


def load_weights(path: str | Path, kind: str | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(tensors, metadata); with `kind`, the metadata is validated before a single tensor is read."""
    metadata = read_metadata(path)
    if kind is not None:
        validate_metadata(metadata, kind, path)
    return read_tensors(path), metadata


def _load_model(path: str | Path, kind: str, build: Callable[[dict[str, Any]], nn.Module], device):
    state, metadata = load_weights(path, kind)
    model = build(metadata)
    load_strict(model, state, path)
    return model.to(device).eval(), metadata


def load_dit(path: str | Path, device: str | torch.device = "cpu"):
    """(model in eval mode, objective, metadata) from a DiT weights file, loaded strictly."""
    model, metadata = _load_model(path, DIT_KIND, build_dit_from_metadata, device)
    return model, build_objective_from_metadata(metadata), metadata


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, metadata) from a classifier weights file, loaded strictly."""
    return _load_model(path, CLASSIFIER_KIND, build_classifier_from_metadata, device)


def classifier_normalize(images_unit: torch.Tensor, metadata: dict[str, Any] | None = None) -> torch.Tensor:
    """Unit-range images (B, 3, H, W) -> the normalised input the classifier was trained on."""
    norm = (metadata or {}).get("normalization", {"mean": IMAGENET_MEAN, "std": IMAGENET_STD})
    mean, std = (torch.tensor(norm[k], device=images_unit.device, dtype=images_unit.dtype) for k in ("mean", "std"))
    return (images_unit - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)


def unit_to_dit(images_unit: torch.Tensor) -> torch.Tensor:
    return images_unit * 2 - 1


def dit_to_unit(x: torch.Tensor) -> torch.Tensor:
    return ((x + 1) / 2).clamp(0, 1)


# --- Training states: what a checkpoint holds, nested state dicts <-> (tensors, JSON), and the state folders -----
@dataclass
class TrainingState:
    """What a checkpoint holds and restores: weights and optimizer moments, and where a trainer has them its EMA
    and fp16 loss scale. A trainer adds its own JSON-able record (step, epoch, setup) when saving."""

    model: nn.Module  # the plain module (no DDP / compile wrapper)
    optimizer: Any  # the (prepared) optimizer
    ema: Any = None  # train_dit.EMA
    scaler: Any = None  # Accelerate's fp16 gradient scaler, if any

    def state_dict(self, **record: Any) -> dict[str, Any]:
        parts = {"ema": self.ema, "scaler": self.scaler}
        extra = {name: part.state_dict() for name, part in parts.items() if part is not None}
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), **extra, **record}

    def load(self, state: dict[str, Any], folder: Path) -> None:
        """Restore; one UserError if the state does not fit (missing parts, wrong shapes)."""
        try:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            if self.ema is not None:
                self.ema.load_state_dict(state["ema"])
            if self.scaler is not None and "scaler" in state:
                self.scaler.load_state_dict(state["scaler"])
        except (KeyError, TypeError, ValueError, RuntimeError) as error:
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise UserError(f"{folder} holds no training state this run can load ({reason}) — use the flags and "
                            "data of the run that saved it, or a new --run-name") from error  # fmt: skip
        # States are stored contiguous, so a channels-last parameter's Adam moments come back in NCHW order, and
        # the fused AdamW kernel, which walks parameter and moments as flat memory, would pair the wrong elements.
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        for param, moments in inner.state.items():
            for key, value in moments.items():
                if torch.is_tensor(value) and value.shape == param.shape and value.stride() != param.stride():
                    moments[key] = torch.empty_like(param).copy_(value)


STATE_PREFIX, COMPLETE_MARKER, TENSORS_FILE, STRUCTURE_FILE = "step_", "COMPLETE", "state.safetensors", "state.json"
_TENSOR, _TUPLE, _DICT = "__tensor__", "__tuple__", "__dict__"  # the tags of state.json
MAX_STATE_DEPTH = 32  # a trainer's state is 6 levels deep (optimizer -> state -> parameter -> moment)


def flatten_state(state: Any) -> tuple[dict[str, torch.Tensor], Any]:
    """A nested state (dicts with str/int keys, lists, tuples, tensors, scalars) as (tensors, JSON structure)."""
    tensors: dict[str, torch.Tensor] = {}

    def encode(value: Any, path: str) -> Any:
        if isinstance(value, torch.Tensor):
            tensors[path] = value.detach().to("cpu").contiguous().clone()
            return {_TENSOR: path}
        if isinstance(value, dict):
            bad = next((key for key in value if not (isinstance(key, str) or type(key) is int)), None)
            if bad is not None:
                raise TypeError(f"cannot store the {type(bad).__name__} key {bad!r} at {path}")
            return {_DICT: [[key, encode(item, f"{path}.{key}")] for key, item in value.items()]}
        if isinstance(value, tuple | list):
            items = [encode(item, f"{path}.{i}") for i, item in enumerate(value)]
            return {_TUPLE: items} if isinstance(value, tuple) else items
        if value is None or isinstance(value, bool | int | float | str):
            return value
        raise TypeError(f"cannot store {type(value).__name__} at {path} in a checkpoint")

    return tensors, encode(state, "state")


def unflatten_state(tensors: dict[str, torch.Tensor], structure: Any, depth: int = 0) -> Any:
    """Inverse of `flatten_state`; ValueError for anything it cannot have written."""
    if depth > MAX_STATE_DEPTH:
        raise ValueError(f"the structure is nested deeper than {MAX_STATE_DEPTH} levels")
    if isinstance(structure, list):
        return [unflatten_state(tensors, item, depth + 1) for item in structure]
    if not isinstance(structure, dict):
        return structure
    ((tag, body),) = structure.items() if len(structure) == 1 else [(None, None)]
    if tag == _TENSOR and isinstance(body, str) and body in tensors:
        return tensors[body]
    if tag == _TUPLE and isinstance(body, list):
        return tuple(unflatten_state(tensors, item, depth + 1) for item in body)
    pairs = isinstance(body, list) and all(
        isinstance(p, list) and len(p) == 2 and isinstance(p[0], str | int) for p in body
    )
    if tag == _DICT and pairs:
        return {key: unflatten_state(tensors, item, depth + 1) for key, item in body}
    raise ValueError(f"unknown entry {reprlib.repr(structure)}")  # fmt: skip


def state_dir_name(step: int) -> str:
    return f"{STATE_PREFIX}{step:07d}"


def _named_step(folder: Path) -> int | None:
    suffix = folder.name.removeprefix(STATE_PREFIX)
    return int(suffix) if folder.name.startswith(STATE_PREFIX) and suffix.isascii() and suffix.isdigit() else None


def _marked_step(folder: Path) -> int | None:
    """The step a folder's COMPLETE marker names, or None (no marker, or one this kit did not write)."""
    try:
        text = (folder / COMPLETE_MARKER).read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isascii() and text.isdigit() else None


def _step_folders(root: Path) -> list[tuple[int, Path]]:
    """(step, folder) of every folder named like a state, oldest first; nothing else is ever touched."""
    found = [(_named_step(f), f) for f in root.iterdir()] if root.is_dir() else []
    return sorted((step, f) for step, f in found if step is not None and f.is_dir())


def list_complete_states(root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every complete checkpoint (its marker names its step), oldest first."""
    return [(step, folder) for step, folder in _step_folders(Path(root)) if _marked_step(folder) == step]


def save_training_state(root: str | Path, step: int, state: dict[str, Any]) -> Path:
    """Write `state` to `root/step_N/` atomically and mark it complete; refuses NaN/inf tensors, and a failed write
    leaves every earlier checkpoint as it was and raises one line."""
    root, tensors, structure = Path(root), *flatten_state(state)
    final, tmp = root / state_dir_name(step), root / f".tmp-{state_dir_name(step)}-{os.getpid()}"
    broken = broken_names(tensors)
    if broken:
        raise UserError(f"not saving step {step}: {len(broken)} tensors hold NaN/inf (e.g. {', '.join(broken[:3])}) "
                        "— lower --lr or use --mixed-precision no; the last complete checkpoint is kept")  # fmt: skip
    try:
        tmp.mkdir(parents=True)
        save_file(tensors, str(tmp / TENSORS_FILE))
        (tmp / STRUCTURE_FILE).write_text(json.dumps({"step": step, "state": structure}))
        os.chmod(tmp / TENSORS_FILE, FILE_MODE)
        _fsync(tmp)
        shutil.rmtree(final, ignore_errors=True)  # an unmarked leftover of a killed run at the same step
        os.replace(tmp, final)
        write_atomic(final / COMPLETE_MARKER, f"{step}\n")  # whole or not at all: a full disk leaves no empty marker
        _fsync(final)
    except (OSError, SafetensorError) as error:
        shutil.rmtree(tmp, ignore_errors=True)
        if _marked_step(final) != step:
            shutil.rmtree(final, ignore_errors=True)
        raise write_failure(f"the training state of step {step}", final, error) from error
    return final


def _fsync(folder: Path) -> None:
    """Files, then the folder: data must reach the disk before the rename or marker that vouches for it."""
    for path in [*folder.iterdir(), folder]:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def load_training_state(folder: str | Path) -> tuple[int, dict[str, Any]]:
    """(step, state) of a complete state folder, every tensor finite; one UserError line for anything else."""
    folder = Path(folder)

    def refuse(reason: str):
        raise UserError(f"{printable(folder)} is not a usable training-state checkpoint: {printable(reason)} — pass a "
                        f"folder like <run>/state/{state_dir_name(10000)}, or --resume auto")  # fmt: skip

    if not folder.is_dir():
        refuse("a file, not a folder" if folder.exists() else "no such folder")
    marked = _marked_step(folder)
    if marked is None:
        refuse(f"no {COMPLETE_MARKER} marker naming its step (a write that never finished, or not a state folder)")
    try:
        saved = json.loads((folder / STRUCTURE_FILE).read_bytes())
        tensors = load_bytes((folder / TENSORS_FILE).read_bytes())  # no mmap: it would hold the file open
        state = unflatten_state(tensors, saved["state"]) if isinstance(saved, dict) else None
    except (OSError, ValueError, RecursionError, KeyError, SafetensorError) as error:
        refuse(f"{type(error).__name__}: {str(error)[:200]}")
    if (
        not isinstance(state, dict)
        or type(saved.get("step")) is not int
        or saved["step"] != marked
        or _named_step(folder) not in (None, marked)
    ):
        refuse(f"{STRUCTURE_FILE} does not hold the state of step {marked}, the step its marker names")
    broken = broken_names(tensors)
    if broken:
        refuse(f"{len(broken)} tensors hold NaN/inf (e.g. {', '.join(broken[:3])}); resume from an earlier state")
    return marked, state


def find_resume_state(resume: str, root: str | Path) -> Path | None:
    """The state folder --resume names: auto = the newest complete one (None: start fresh); never = None, refused when
    the run already has states (two runs would mix); else the path itself (load_training_state checks it)."""
    states = list_complete_states(root)
    if resume == "never" and states:
        raise UserError(
            f"run {Path(root).parent} already has checkpoints (newest step {states[-1][0]}); --resume never would "
            "mix two runs there — use another --run-name, or --resume auto to continue it"
        )
    if resume in ("auto", "never"):
        return states[-1][1] if states and resume == "auto" else None
    return Path(resume)


def remove_unfinished_writes(root: str | Path) -> int:
    """Delete the temp folders of state writes a killed run left behind (each is a whole state's size)."""
    leftovers = list(Path(root).glob(".tmp-step_*")) if Path(root).is_dir() else []
    for folder in leftovers:
        shutil.rmtree(folder)
    return len(leftovers)


def prune_states(root: str | Path, keep: int) -> None:
    """Delete all but the newest `keep` complete checkpoints (never the newest), and every unmarked step folder older
    than the newest complete one (what a kill mid-delete or mid-save left). A save in progress is newer than every
    complete checkpoint, and nothing not named like a state folder is ever touched."""
    states = list_complete_states(root)
    for _, folder in states[: max(0, len(states) - max(keep, 1))]:
        (folder / COMPLETE_MARKER).unlink(missing_ok=True)  # first: a kill mid-delete leaves an ignored folder
        shutil.rmtree(folder)
    complete = {folder for _, folder in states}
    for step, folder in _step_folders(Path(root)):
        if states and step < states[-1][0] and folder not in complete:
            shutil.rmtree(folder)
