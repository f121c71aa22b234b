"""Draw class-conditional samples from a trained TinyDiT: a grid (one row per class) or a folder of PNGs.

    python scripts/sample.py --checkpoint checkpoints/tinydit_final.safetensors --class calico 2 --num 8 \
        --out samples/grid.png

The model, objective and class names come from the checkpoint's metadata alone. The sampling itself lives in
scripts/lib/sampling.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torchvision.utils import save_image

from scripts.lib.cli import UserError, option, run_main
from scripts.lib.checkpoints import load_dit
from scripts.lib.cli import DEVICES, resolve_device_type
from scripts.lib.sampling import class_grid_labels, resolve_classes, sample_images, save_grid


@dataclass
class SampleConfig:
    checkpoint: str = option("checkpoints/tinydit_final.safetensors", "TinyDiT weights file (.safetensors)")
    classes: list[str] = option(
        [], "class names or ids to sample, one grid row each; none given = all classes", flag="--class"
    )
    num: int = option(8, "images per class")
    steps: int = option(50, "sampling steps")
    cfg_scale: float = option(4.0, "classifier-free guidance scale (1 = no guidance)")
    sampler: str | None = option(
        None,
        "sampler of the checkpoint's objective (flow: euler/heun, ddpm: ddim/ddpm); None = the objective's default",
    )
    seed: int = option(0, "seed of the starting noise; the same seed gives the same images")
    out: str = option("samples/grid.png", "a .png path for one grid, or a folder for one PNG per image")
    device: str = option("auto", "where to run", choices=DEVICES)


def validate_config(cfg: SampleConfig) -> None:
    problems = [
        f"--{name} must be positive (got {value})"
        for name, value in (("num", cfg.num), ("steps", cfg.steps))
        if value < 1
    ]
    if cfg.cfg_scale < 0:
        problems.append(f"--cfg-scale must be >= 0 (got {cfg.cfg_scale})")
    if problems:
        raise UserError("; ".join(problems))


def main(cfg: SampleConfig) -> list[Path]:
    """Sample and write the grid (or the folder of images); returns the written paths."""
    validate_config(cfg)
    device = torch.device(resolve_device_type(cfg.device))
    model, objective, metadata = load_dit(cfg.checkpoint, device=device)
    sampler = cfg.sampler or objective.default_sampler
    if sampler not in objective.samplers:
        raise UserError(
            f"unknown --sampler {sampler!r} for the {metadata['objective']} objective — choose "
            f"one of {', '.join(objective.samplers)}"
        )
    class_names = metadata["class_names"]
    class_ids = resolve_classes(cfg.classes, class_names)
    labels = class_grid_labels(class_ids, cfg.num, device)
    images = sample_images(
        model,
        objective,
        labels,
        steps=cfg.steps,
        cfg_scale=cfg.cfg_scale,
        sampler=sampler,
        seed=cfg.seed,
    )
    out = Path(cfg.out)
    if out.suffix.lower() == ".png":
        written = [save_grid(images, out, per_row=cfg.num)]
    else:
        out.mkdir(parents=True, exist_ok=True)
        written = []
        for index, (image, label) in enumerate(zip(images, labels.tolist(), strict=True)):
            path = out / f"{index:04d}_{class_names[label]}.png"
            save_image(image.cpu(), path)
            written.append(path)
    rows = ", ".join(class_names[i] for i in class_ids)
    print(f"wrote {len(images)} samples ({cfg.num} per class; rows: {rows}) to {out}")
    return written


if __name__ == "__main__":
    run_main(main, SampleConfig, "Sample class-conditional images from a trained TinyDiT checkpoint.")
