"""Sampling a trained TinyDiT into images and grids: what sample.py, evaluate.py, verify_checkpoint.py,
export_dit_onnx.py and the trainer's periodic grids share."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.utils import save_image
from tqdm import tqdm

from scripts.lib.cli import UserError
from scripts.lib.model_files import dit_to_unit

# Guidance scale of a checkpoint that records none (DiT samples with 4 in its paper's best figures).
DEFAULT_CFG_SCALE = 4.0

# Sample grids during training: one row per class, up to this many columns.
GRID_COLUMNS = 8
# Off a GPU a grid may take this share of the training time so far (at least GRID_MIN_BUDGET_S); fewer columns,
# then fewer sampler steps, keep it there, e.g. the README's 2-core debug run spends ~20 s instead of 10 minutes.
GRID_TIME_SHARE = 0.05
GRID_MIN_BUDGET_S = 20.0
GRID_MIN_COLUMNS = 2
GRID_MIN_STEPS = 10
# A forward pass costs about a third of a training step's forward + backward.
FORWARD_SHARE_OF_TRAINING = 1 / 3

# Images per forward batch (x2 with classifier-free guidance): bounds memory for large --num.
SAMPLE_CHUNK = 64


class SamplingStopped(Exception):
    """Raised between two sampler steps when `should_stop()` says so (a signal arrived during a grid)."""


@torch.no_grad()
def sample_images(model: nn.Module, objective, labels: torch.Tensor, *, steps: int, cfg_scale: float,
                  sampler: str | None, seed: int, image_size: int, in_channels: int, progress: str | None = None,
                  should_stop: Callable[[], bool] | None = None) -> torch.Tensor:
    """Unit-range images (N, C, H, W) for class `labels` (N,), from noise fixed by `seed`.

    `progress`: the description of a progress bar (with ETA) over all sampler steps; None shows none.
    `should_stop()` is asked after every sampler step; True raises SamplingStopped.
    """
    device = labels.device
    generator = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn(len(labels), in_channels, image_size, image_size, generator=generator, device=device)
    starts = range(0, len(labels), SAMPLE_CHUNK)
    bar = tqdm(total=len(starts) * steps, desc=progress, unit="step", disable=progress is None, leave=False,
               dynamic_ncols=True)

    def after_step() -> None:
        bar.update()
        if should_stop is not None and should_stop():
            raise SamplingStopped

    with bar:
        chunks = [objective.sample(model, noise[i:i + SAMPLE_CHUNK], labels[i:i + SAMPLE_CHUNK], steps=steps,
                                   cfg_scale=cfg_scale, sampler=sampler, generator=generator, on_step=after_step)
                  for i in starts]
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


def grid_plan(num_classes: int, sample_steps: int, cfg_scale: float, device: torch.device,
              seconds_per_image_trained: float | None, training_seconds: float) -> tuple[int, int, float | None]:
    """(columns, sampler steps, estimated seconds or None) of a training-time sample grid.

    On a GPU (or before any training step was timed): up to GRID_COLUMNS columns and all `sample_steps`. Elsewhere
    the estimate from the training speed is held to max(GRID_MIN_BUDGET_S, GRID_TIME_SHARE x training time).
    """
    columns, steps = max(GRID_MIN_COLUMNS, min(GRID_COLUMNS, 64 // num_classes)), sample_steps
    if seconds_per_image_trained is None or not seconds_per_image_trained > 0:
        return columns, steps, None
    evaluations_per_image = 2 if cfg_scale != 1.0 else 1  # guidance runs the null class beside each image

    def cost(columns: int, steps: int) -> float:
        images = num_classes * columns * evaluations_per_image
        return images * steps * seconds_per_image_trained * FORWARD_SHARE_OF_TRAINING

    if device.type != "cuda":
        budget = max(GRID_MIN_BUDGET_S, GRID_TIME_SHARE * training_seconds)
        while cost(columns, steps) > budget and columns > GRID_MIN_COLUMNS:
            columns -= 1
        while cost(columns, steps) > budget and steps > GRID_MIN_STEPS:
            steps = max(GRID_MIN_STEPS, steps * 3 // 4)
    return columns, steps, cost(columns, steps)
