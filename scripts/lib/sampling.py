"""Sampling a trained TinyDiT into images and grids: what sample.py, evaluate.py, verify_checkpoint.py,
export_dit_onnx.py and the trainer's periodic grids share."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.utils import save_image
from tqdm import tqdm

from scripts.lib.cli import UserError
from scripts.lib.checkpoints import dit_to_unit

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
def sample_images(
    model: nn.Module,
    objective,
    labels: torch.Tensor,
    *,
    steps: int,
    cfg_scale: float,
    sampler: str | None,
    seed: int,
    image_size: int,
    in_channels: int,
    progress: str | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Unit-range images (N, C, H, W) for class `labels` (N,), from noise fixed by `seed`.

    `progress`: the description of a progress bar (with ETA) over all sampler steps; None shows none.
    `should_stop()` is asked after every sampler step; True raises SamplingStopped.
    """
    device = labels.device
    generator = torch.Generator(device=device).manual_seed(seed)
    noise = torch.randn(len(labels), in_channels, image_size, image_size, generator=generator, device=device)
    starts = range(0, len(labels), SAMPLE_CHUNK)
    bar = tqdm(
        total=len(starts) * steps, desc=progress, unit="step", disable=progress is None, leave=False, dynamic_ncols=True
    )

    def after_step() -> None:
        bar.update()
        if should_stop is not None and should_stop():
            raise SamplingStopped

    with bar:
        chunks = [
            objective.sample(
                model,
                noise[i : i + SAMPLE_CHUNK],
                labels[i : i + SAMPLE_CHUNK],
                steps=steps,
                cfg_scale=cfg_scale,
                sampler=sampler,
                generator=generator,
                on_step=after_step,
            )
            for i in starts
        ]
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
        elif item.isascii() and item.isdigit() and int(item) < len(class_names):
            ids.append(int(item))
        else:
            raise UserError(
                f"unknown class {item!r} — this checkpoint knows {', '.join(class_names)} "
                f"(or ids 0..{len(class_names) - 1})"
            )
    return ids


def guidance_scale(requested: float | None, metadata: dict[str, Any]) -> float:
    """The requested guidance scale, else the one the DiT was trained to sample with, else the default."""
    if requested is not None:
        return requested
    return (metadata.get("config") or {}).get("cfg_scale", DEFAULT_CFG_SCALE)


def grid_plan(
    num_classes: int,
    sample_steps: int,
    cfg_scale: float,
    device: torch.device,
    seconds_per_image_trained: float | None,
    training_seconds: float,
) -> tuple[int, int, float | None]:
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


def write_training_grid(
    run,
    cfg,
    ema_model: nn.Module,
    objective,
    step: int,
    should_stop: Callable[[], bool],
    seconds_per_image: float | None,
    training_seconds: float,
) -> None:
    """A fixed-seed EMA grid of a DiT run, one row per class, at samples/step_NNNNNNN.png (main process; the
    others wait). `cfg` gives sample_steps, cfg_scale, seed and image_size. Off a GPU the grid is sized by
    `grid_plan` and its cost logged; `should_stop()` (a signal) ends it at the next sampler step, unsaved."""
    if run.is_main:
        num_classes = run.cache.num_classes
        plan = grid_plan(num_classes, cfg.sample_steps, cfg.cfg_scale, run.device, seconds_per_image, training_seconds)
        columns, steps, estimate = plan
        labels = class_grid_labels(list(range(num_classes)), columns, run.device)
        started = time.perf_counter()
        try:
            with run.accelerator.autocast():
                images = sample_images(
                    ema_model,
                    objective,
                    labels,
                    steps=steps,
                    cfg_scale=cfg.cfg_scale,
                    sampler=None,
                    seed=cfg.seed,
                    image_size=cfg.image_size,
                    in_channels=3,
                    progress=f"sample grid {step}",
                    should_stop=should_stop,
                )
            path = save_grid(images, run.run_dir / "samples" / f"step_{step:07d}.png", per_row=columns)
            guess = "" if estimate is None else f", estimated {estimate:.0f} s"
            run.logger.info(
                "sample grid %s: %d classes x %d, %d steps, CFG %g (took %.1f s%s)",
                path,
                num_classes,
                columns,
                steps,
                cfg.cfg_scale,
                time.perf_counter() - started,
                guess,
            )
            run.status.update(newest_grid=str(path.relative_to(run.run_dir)))
        except SamplingStopped:
            run.logger.info("sample grid of step %d stopped by a signal", step)
    run.accelerator.wait_for_everyone()
