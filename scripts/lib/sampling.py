"""Sampling a trained TinyDiT into images and grids: what sample.py, evaluate.py, verify_checkpoint.py,
export_dit_onnx.py and the trainer's periodic grids share."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.utils import save_image

from scripts.lib.cli import UserError
from scripts.lib.model_files import dit_to_unit

# Guidance scale of a checkpoint that records none (DiT samples with 4 in its paper's best figures).
DEFAULT_CFG_SCALE = 4.0

# Images per forward batch (x2 with classifier-free guidance): bounds memory for large --num.
SAMPLE_CHUNK = 64


@torch.no_grad()
def sample_images(model: nn.Module, objective, labels: torch.Tensor, *, steps: int, cfg_scale: float,
                  sampler: str | None, seed: int, image_size: int, in_channels: int) -> torch.Tensor:
    """Unit-range images (N, C, H, W) for class `labels` (N,), from noise fixed by `seed`."""
    device = labels.device
    generator = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn(len(labels), in_channels, image_size, image_size, generator=generator, device=device)
    chunks = [objective.sample(model, noise[i:i + SAMPLE_CHUNK], labels[i:i + SAMPLE_CHUNK], steps=steps,
                               cfg_scale=cfg_scale, sampler=sampler, generator=generator)
              for i in range(0, len(labels), SAMPLE_CHUNK)]
    return dit_to_unit(torch.cat(chunks).float())


def class_grid_labels(class_ids: list[int], per_class: int, device: torch.device | str) -> torch.Tensor:
    """Labels for a grid with one row per class: [c0]*per_class + [c1]*per_class + ..."""
    return torch.tensor(class_ids, device=device).repeat_interleave(per_class)


def save_grid(images: torch.Tensor, path: Path, per_row: int) -> Path:
    """Write `images` as one PNG grid with `per_row` images per row."""
    path.parent.mkdir(parents=True, exist_ok=True)
    save_image(images.cpu(), path, nrow=per_row, padding=2, pad_value=1.0)
    return path


def resolve_classes(requested: list[str], class_names: list[str]) -> list[int]:
    """Class ids for names or numeric ids given on the command line (all classes when none given)."""
    if not requested:
        return list(range(len(class_names)))
    ids = []
    for item in requested:
        if item in class_names:
            ids.append(class_names.index(item))
        elif item.isdigit() and int(item) < len(class_names):
            ids.append(int(item))
        else:
            raise UserError(f"unknown class {item!r} — this checkpoint knows {', '.join(class_names)} "
                            f"(or ids 0..{len(class_names) - 1})")
    return ids


def guidance_scale(requested: float | None, metadata: dict[str, Any]) -> float:
    """The requested guidance scale, else the one the DiT was trained to sample with, else the default."""
    if requested is not None:
        return requested
    return (metadata.get("config") or {}).get("cfg_scale", DEFAULT_CFG_SCALE)
