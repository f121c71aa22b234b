"""Draw class-conditional samples from a trained TinyDiT, whose checkpoint holds everything but the request: one grid
(a row per class) or a folder of PNGs.

    python scripts/sample.py --checkpoint checkpoints/tinydit_final.safetensors --class calico 2 --num 8 --out grid.png
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from scripts.lib.checkpoints import load_dit
from scripts.lib.cli import DEVICES, UserError, cpu_threads_option, option, printable, resolve_device_type, run_main
from scripts.lib.cli import refuse, write_failure
from scripts.lib.data import available_memory_bytes
from scripts.lib.sampling import DEFAULT_CFG_SCALE, class_grid_labels, guidance_scale, resolve_classes
from scripts.lib.sampling import GRID_SUFFIXES, resolve_sampler, sample_images, save_grid

# Float copies of every image alive at the peak: the noise, the sampled chunks, their concatenation and two
# temporaries of the conversion to unit range (the grid written afterwards needs fewer).
COPIES_AT_PEAK = 5
# A class name may fill a file name's 255 bytes by itself, so the file names keep only its first bytes.
NAME_BYTES_IN_FILE_NAME = 64


@dataclass
class SampleConfig:
    checkpoint: str = option("checkpoints/tinydit_final.safetensors", "TinyDiT weights file (.safetensors)")
    classes: list[str] = option([], "class names or ids to sample, a grid row each; none: all", flag="--class")
    num: int = option(8, "images per class")
    steps: int = option(50, "sampling steps")
    cfg_scale: float | None = option(None, f"guidance scale (1 = none); default: as trained, else {DEFAULT_CFG_SCALE}")
    sampler: str | None = option(None, "flow: euler/heun, ddpm: ddim/ddpm; default: the checkpoint objective's own")
    seed: int = option(0, "seed of the starting noise; the same seed gives the same images")
    out: str = option("checkpoints/samples.png", f"a {'/'.join(GRID_SUFFIXES)} file: one grid; else a folder of PNGs")
    device: str = option("auto", "where to run", choices=DEVICES)
    cpu_threads: int = cpu_threads_option()


def check_request(cfg: SampleConfig) -> bool:
    """Refuse what the flags alone show to be wrong, before a model is loaded; True when --out is one grid."""
    out, is_grid = Path(cfg.out), Path(cfg.out).suffix.lower() in GRID_SUFFIXES
    shown, kinds = printable(out), "/".join(GRID_SUFFIXES)
    refusals = {
        f"--num must be positive (got {cfg.num})": cfg.num < 1,
        f"--steps must be positive (got {cfg.steps})": cfg.steps < 1,
        f"--cfg-scale must be >= 0 (got {cfg.cfg_scale})": cfg.cfg_scale is not None and cfg.cfg_scale < 0,
        f"--out {shown} is a folder, not a grid file — pass e.g. {shown}/grid.png": is_grid and out.is_dir(),
        f"--out {shown} is a file, not a folder — pass a new folder or a {kinds} file": not is_grid and out.is_file(),
    }
    refuse(refusals)
    return is_grid


def refuse_what_cannot_fit(cfg: SampleConfig, num_classes: int, model: torch.nn.Module, device: torch.device) -> None:
    """Sampling holds every image at once: a --num whose images cannot fit is refused before it starts."""
    column_bytes = num_classes * model.in_channels * model.image_size**2 * 4 * COPIES_AT_PEAK  # an image per class
    gpu = torch.cuda.mem_get_info(device)[0] if device.type == "cuda" else None
    for where, free in {"memory": available_memory_bytes(), "GPU memory": gpu}.items():
        if free is not None and column_bytes * cfg.num > free:
            raise UserError(
                f"--num {cfg.num} x {num_classes} classes needs ~{column_bytes * cfg.num / 2**30:,.1f} GiB of {where}, "
                f"{free / 2**30:,.1f} GiB is available — pass --num {free // column_bytes} or less "
                "(another --seed gives more images in another run)"
            )


def main(cfg: SampleConfig) -> list[Path]:
    is_grid, out = check_request(cfg), Path(cfg.out)
    device = torch.device(resolve_device_type(cfg.device))
    model, objective, metadata = load_dit(cfg.checkpoint, device=device)
    sampler, cfg_scale = resolve_sampler(objective, cfg.sampler), guidance_scale(cfg.cfg_scale, metadata)
    class_names = metadata["class_names"]
    class_ids = resolve_classes(cfg.classes, class_names)
    refuse_what_cannot_fit(cfg, len(class_ids), model, device)
    try:  # a folder that cannot be made fails now, not after the sampling
        (out.parent if is_grid else out).mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise write_failure("the samples", out, error) from None
    labels = class_grid_labels(class_ids, cfg.num, device)
    images = sample_images(
        model, objective, labels, steps=cfg.steps, cfg_scale=cfg_scale, sampler=sampler, seed=cfg.seed
    )
    if is_grid:
        batches, paths = [images], [out]
    else:  # batches of one image: save_grid adds no padding then
        short = [name.encode()[:NAME_BYTES_IN_FILE_NAME].decode(errors="ignore") for name in class_names]
        batches, paths = images[:, None], [out / f"{i:04d}_{short[c]}.png" for i, c in enumerate(labels.tolist())]
    for batch, path in zip(batches, paths, strict=True):
        save_grid(batch, path, per_row=cfg.num, what="the samples")
    rows = ", ".join(class_names[i] for i in class_ids)
    print(
        f"wrote {len(images)} samples ({cfg.num} per class, {sampler} {cfg.steps} steps, cfg {cfg_scale:g}; "
        f"rows: {rows}) to {printable(out)}"
    )
    return paths


if __name__ == "__main__":
    run_main(main, SampleConfig, "Sample class-conditional images from a trained TinyDiT checkpoint.")
