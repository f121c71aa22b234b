"""Sampling a trained TinyDiT into images and grids, with a progress bar: what sample, evaluate, verify, the DiT
exporter and the trainer's grids share. Guidance defaults to the scale the DiT was trained with."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torchvision.utils import save_image
from tqdm import tqdm

from scripts.lib.checkpoints import dit_to_unit
from scripts.lib.cli import UserError, printable, save_output

DEFAULT_CFG_SCALE = 4.0  # of a checkpoint that records none (DiT's best figures sample with 4)
SAMPLE_CHUNK = 64  # images per forward batch (x2 with guidance): bounds memory for any --num
GRID_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp")  # what save_grid writes, by suffix


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


def save_grid(images: torch.Tensor, path: Path, per_row: int, what: str = "the sample grid") -> Path:
    """`images` as one grid with `per_row` images per row, in the format of its GRID_SUFFIXES suffix, written whole
    or not at all; a failed write is one line naming `what`."""
    suffix = Path(path).suffix.lower().lstrip(".")
    image_format = {"jpg": "jpeg"}.get(suffix, suffix)
    writer = lambda tmp: save_image(images.cpu(), tmp, nrow=per_row, padding=2, pad_value=1.0, format=image_format)  # noqa: E731
    return save_output(Path(path), writer, what)
