"""Sampling a trained TinyDiT into images and grids, with a progress bar: what sample, evaluate, verify, the DiT
exporter and the trainer's periodic grids share. Guidance defaults to the scale the DiT was trained with."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import broadcast_object_list
from torch import nn
from torchvision.utils import save_image
from tqdm import tqdm

from scripts.lib.checkpoints import dit_to_unit
from scripts.lib.cli import UserError, printable, write_atomic

DEFAULT_CFG_SCALE = 4.0  # of a checkpoint that records none (DiT's best figures sample with 4)
SAMPLE_CHUNK = 64  # images per forward batch (x2 with guidance): bounds memory for any --num
# Training grids: one row per class, up to GRID_COLUMNS. Off a GPU a grid may take GRID_TIME_SHARE of the training
# time so far (at least GRID_MIN_BUDGET_S): fewer columns, then fewer sampler steps (the 2-core debug run spends
# ~20 s instead of 10 minutes). A forward pass costs about a third of a training step's forward + backward.
GRID_COLUMNS, GRID_MIN_COLUMNS, GRID_MIN_STEPS = 8, 2, 10
GRID_TIME_SHARE, GRID_MIN_BUDGET_S, FORWARD_SHARE_OF_TRAINING = 0.05, 20.0, 1 / 3


class SamplingStopped(Exception):
    """Raised between two sampler steps when `should_stop()` says so (a signal arrived during a grid)."""


def resolve_sampler(objective, requested: str | None) -> str:
    """--sampler, checked against the checkpoint's objective (None: the objective's default)."""
    sampler = requested or objective.default_sampler
    if sampler not in objective.samplers:
        raise UserError(
            f"--sampler {printable(sampler)!r} is not a sampler of the {objective.name} objective — choose one of "
            f"{', '.join(objective.samplers)}"
        )
    return sampler


def guidance_scale(requested: float | None, metadata: dict[str, Any]) -> float:
    """--cfg-scale if given, else the scale the DiT was trained to sample with, else DEFAULT_CFG_SCALE."""
    if requested is not None:
        return requested
    trained = (metadata.get("config") or {}).get("cfg_scale")
    return DEFAULT_CFG_SCALE if trained is None else trained


@torch.no_grad()
def sample_images(
    model: nn.Module, objective, labels: torch.Tensor, *, steps: int, cfg_scale: float, sampler: str | None = None,
    seed: int = 0, progress: str | None = "sampling", should_stop: Callable[[], bool] | None = None,
) -> torch.Tensor:  # fmt: skip
    """Unit-range images (N, C, H, W) for class `labels` (N,), from noise fixed by `seed`, SAMPLE_CHUNK at a time.
    `progress` describes a bar with ETA over all sampler steps (None: no bar); `should_stop()`, asked after every
    sampler step, stops it with SamplingStopped."""
    generator = torch.Generator(device=labels.device).manual_seed(seed)
    shape = (len(labels), model.in_channels, model.image_size, model.image_size)
    noise = torch.randn(shape, generator=generator, device=labels.device)
    chunks = list(zip(noise.split(SAMPLE_CHUNK), labels.split(SAMPLE_CHUNK), strict=True))
    bar = tqdm(total=len(chunks) * steps, desc=progress, unit="step", disable=progress is None, leave=False)

    def after_step() -> None:
        bar.update()
        if should_stop is not None and should_stop():
            raise SamplingStopped

    options = dict(steps=steps, cfg_scale=cfg_scale, sampler=sampler, generator=generator, on_step=after_step)
    with bar:
        images = [objective.sample(model, chunk_noise, chunk_labels, **options) for chunk_noise, chunk_labels in chunks]
    return dit_to_unit(torch.cat(images).float())


def class_grid_labels(class_ids: list[int], per_class: int, device: torch.device | str) -> torch.Tensor:
    """Labels for a grid with one row per class: [c0]*per_class + [c1]*per_class + ..."""
    return torch.tensor(class_ids, device=device).repeat_interleave(per_class)


def resolve_classes(requested: list[str], class_names: list[str]) -> list[int]:
    """Class ids for names or numeric ids given on the command line (all classes when none given)."""
    ids = []
    for item in requested:
        if item in class_names:
            ids.append(class_names.index(item))
        elif item.isascii() and item.isdigit() and int(item) < len(class_names):
            ids.append(int(item))
        else:
            raise UserError(
                f"unknown class {printable(item)!r} — this checkpoint knows {printable(', '.join(class_names))} "
                f"(or ids 0..{len(class_names) - 1})"
            )
    return ids or list(range(len(class_names)))


def save_grid(images: torch.Tensor, path: Path, per_row: int) -> Path:
    """`images` as one PNG grid with `per_row` images per row, written whole or not at all."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = path.suffix.lower().lstrip(".") or "png"
    image_format = {"jpg": "jpeg", "tif": "tiff"}.get(suffix, suffix)
    writer = lambda tmp: save_image(images.cpu(), tmp, nrow=per_row, padding=2, pad_value=1.0, format=image_format)  # noqa: E731
    return write_atomic(path, writer)


def grid_plan(
    num_classes: int, sample_steps: int, cfg_scale: float, device: torch.device, seconds_per_image: float | None,
    training_seconds: float,
) -> tuple[int, int, float | None]:  # fmt: skip
    """(columns, sampler steps, estimated seconds or None) of a training grid; see GRID_* above."""
    columns, steps = max(GRID_MIN_COLUMNS, min(GRID_COLUMNS, 64 // num_classes)), sample_steps
    if not seconds_per_image or not seconds_per_image > 0:
        return columns, steps, None
    forward_seconds = num_classes * (2 if cfg_scale != 1.0 else 1) * seconds_per_image * FORWARD_SHARE_OF_TRAINING

    def cost(columns: int, steps: int) -> float:
        return columns * steps * forward_seconds

    if device.type != "cuda":
        budget = max(GRID_MIN_BUDGET_S, GRID_TIME_SHARE * training_seconds)
        while cost(columns, steps) > budget and columns > GRID_MIN_COLUMNS:
            columns -= 1
        while cost(columns, steps) > budget and steps > GRID_MIN_STEPS:
            steps = max(GRID_MIN_STEPS, steps * 3 // 4)
    return columns, steps, cost(columns, steps)


def write_training_grid(
    run, cfg, ema_model: nn.Module, objective, step: int, should_stop: Callable[[], bool],
    seconds_per_image: float | None = None, training_seconds: float = 0.0,
) -> bool:  # fmt: skip
    """A fixed-seed EMA grid of a DiT run, one row per class, at samples/step_NNNNNNN.png (main process), sized by
    `grid_plan`. `should_stop()` (a signal) ends it at the next sampler step, unsaved: then False on every rank."""
    written = True
    if run.is_main:
        num_classes = run.cache.num_classes
        plan = grid_plan(num_classes, cfg.sample_steps, cfg.cfg_scale, run.device, seconds_per_image, training_seconds)
        columns, steps, estimate = plan
        labels = class_grid_labels(list(range(num_classes)), columns, run.device)
        started = time.perf_counter()
        try:
            with run.accelerator.autocast():
                images = sample_images(
                    ema_model, objective, labels, steps=steps, cfg_scale=cfg.cfg_scale, seed=cfg.seed,
                    progress=f"sample grid {step}", should_stop=should_stop,
                )  # fmt: skip
            path = save_grid(images, run.run_dir / "samples" / f"step_{step:07d}.png", per_row=columns)
            guess = "" if estimate is None else f", estimated {estimate:.0f} s"
            run.log.info(
                "sample grid %s: %d classes x %d, %d steps, CFG %g (took %.1f s%s)",
                *(path, num_classes, columns, steps, cfg.cfg_scale, time.perf_counter() - started, guess),
            )
            run.status.update(newest_grid=str(path.relative_to(run.run_dir)))
        except SamplingStopped:
            run.log.info("sample grid of step %d stopped by a signal", step)
            written = False
    if run.accelerator.num_processes > 1:  # every rank learns whether the grid was cut short, so all stop alike
        written = broadcast_object_list([written], from_process=0)[0]
    return written
