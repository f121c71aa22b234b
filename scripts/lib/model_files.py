"""The one place that knows what a tiny-cats weights file holds and how to rebuild its model.

Every final checkpoint carries JSON metadata (see `dit_metadata` / `classifier_metadata`) so that
sample, verify, export, predict and evaluate rebuild the exact model from the file alone. Loading is
strict: a file whose tensors do not match the architecture its metadata names is refused, never
"loaded" half-way into a different model.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from models.diffusion import build_objective
from models.tiny_dit import TinyDiT, build_dit
from scripts.lib.checkpoints import load_weights, save_weights
from scripts.lib.cli import UserError

DIT_KIND = "dit"
CLASSIFIER_KIND = "classifier"
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def dit_metadata(cfg_dict: dict[str, Any], *, model_name: str, image_size: int, in_channels: int,
                 class_names: list[str], objective_name: str, objective_options: dict[str, Any], step: int,
                 weights: str) -> dict[str, Any]:
    """Metadata of a DiT weights file. `weights` is "ema" or "raw". Pixels: x in [-1, 1] = 2 * unit - 1."""
    return {"kind": DIT_KIND, "model": model_name, "image_size": image_size, "in_channels": in_channels,
            "num_classes": len(class_names), "class_names": list(class_names), "objective": objective_name,
            "objective_options": dict(objective_options), "step": step, "weights": weights,
            "pixel_range": [-1.0, 1.0], "config": cfg_dict}


def classifier_metadata(cfg_dict: dict[str, Any], *, backbone: str, image_size: int, class_names: list[str],
                        metrics: dict[str, Any], epoch: int) -> dict[str, Any]:
    """Metadata of a classifier weights file: inputs are unit images normalised with ImageNet mean/std."""
    return {"kind": CLASSIFIER_KIND, "backbone": backbone, "image_size": image_size,
            "num_classes": len(class_names), "class_names": list(class_names),
            "normalization": {"mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)},
            "metrics": metrics, "epoch": epoch, "config": cfg_dict}


def _require(metadata: dict[str, Any], kind: str, keys: tuple[str, ...], path: Path | str = "checkpoint") -> None:
    if metadata.get("kind") != kind:
        raise UserError(f"{path}: this is a '{metadata.get('kind')}' checkpoint, not a '{kind}' one")
    missing = [key for key in keys if key not in metadata]
    if missing:
        raise UserError(f"{path}: metadata lacks {', '.join(missing)} — the model cannot be rebuilt")


def build_dit_from_metadata(metadata: dict[str, Any]) -> TinyDiT:
    """An untrained TinyDiT with the architecture the metadata describes."""
    _require(metadata, DIT_KIND, ("model", "image_size", "in_channels", "num_classes"))
    try:
        return build_dit(metadata["model"], metadata["image_size"], metadata["num_classes"], metadata["in_channels"])
    except ValueError as error:
        raise UserError(f"checkpoint metadata describes an impossible model: {error}") from error


def build_objective_from_metadata(metadata: dict[str, Any]):
    _require(metadata, DIT_KIND, ("objective",))
    return build_objective(metadata["objective"], **metadata.get("objective_options", {}))


def build_classifier_from_metadata(metadata: dict[str, Any]) -> nn.Module:
    from models.classifier import build_classifier

    _require(metadata, CLASSIFIER_KIND, ("backbone", "num_classes", "image_size"))
    return build_classifier(metadata["backbone"], metadata["num_classes"], pretrained=False)


def load_strict(model: nn.Module, state_dict: dict[str, torch.Tensor], path: Path | str) -> None:
    """Load every tensor, refusing missing, unexpected or mis-shaped ones with a readable reason."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    mismatched = [f"{name} {tuple(state_dict[name].shape)} != {tuple(tensor.shape)}"
                  for name, tensor in expected.items()
                  if name in state_dict and state_dict[name].shape != tensor.shape]
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
    state_dict, metadata = load_weights(path)
    _require(metadata, DIT_KIND, ("model", "image_size", "in_channels", "num_classes", "objective"), path)
    model = build_dit_from_metadata(metadata)
    load_strict(model, state_dict, path)
    return model.to(device).eval(), build_objective_from_metadata(metadata), metadata


def load_classifier(path: str | Path, device: str | torch.device = "cpu") -> tuple[nn.Module, dict[str, Any]]:
    """(model in eval mode, metadata) from a classifier weights file."""
    state_dict, metadata = load_weights(path)
    _require(metadata, CLASSIFIER_KIND, ("backbone", "num_classes", "image_size"), path)
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
