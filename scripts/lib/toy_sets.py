"""What the built-in toy data sets (make_toy_cats.py, make_toy_glyphs.py) share: the per-image random
generator, the generate loop with its checks and stale-file removal, the command's Config and summary line,
and the drawing pieces that are not about what a class looks like (background, lighting, supersampling).

Each image's randomness comes from a generator seeded by (seed, class index, image index): the same seed
gives identical bytes, and changing --per-class or --classes leaves every other image unchanged.
"""

from __future__ import annotations

import colorsys
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from scripts.lib.cli import UserError, option
from scripts.lib.data import refuse_foreign_classes

# Shapes are drawn at SUPERSAMPLE x the output size and box-downscaled, so edges are anti-aliased.
SUPERSAMPLE = 4
RGB = tuple[int, int, int]
# draw(class_name, rng, size) -> one size x size RGB image, every random number taken from rng.
Drawer = Callable[[str, np.random.Generator, int], Image.Image]


@dataclass(frozen=True)
class ToySet:
    """A built-in data set: its class folders, in the order that seeds the images, and how to draw one."""

    item: str  # what one image shows, for messages: "toy cat"
    classes: tuple[str, ...]
    draw: Drawer


def image_rng(seed: int, class_index: int, image_index: int) -> np.random.Generator:
    return np.random.default_rng([seed, class_index, image_index])


def remove_stale_images(class_dir: Path, class_name: str, keep: int) -> None:
    """Delete our own numbered images beyond `keep`, left by an earlier run with a larger --per-class."""
    for path in class_dir.glob(f"{class_name}_*.png"):
        index = path.stem[len(class_name) + 1 :]
        if index.isdigit() and int(index) >= keep:
            path.unlink()


def generate(
    toy_set: ToySet, out: Path, per_class: int, size: int, seed: int, classes: Sequence[str] | None = None
) -> dict[str, int]:
    """Write `out/<class>/<class>_00000.png` ... and return the number of images per class."""
    chosen = list(classes) if classes else list(toy_set.classes)
    unknown = sorted(set(chosen) - set(toy_set.classes))
    if unknown:
        raise UserError(f"unknown {toy_set.item} class(es) {unknown} — choose from {', '.join(toy_set.classes)}")
    if per_class < 1 or size < 8:
        raise UserError(f"--per-class must be >= 1 and --size >= 8 (got {per_class}, {size})")
    out = Path(out)
    refuse_foreign_classes(out, toy_set.classes)
    counts: dict[str, int] = {}
    for name in chosen:
        class_index = toy_set.classes.index(name)
        class_dir = out / name
        class_dir.mkdir(parents=True, exist_ok=True)
        remove_stale_images(class_dir, name, per_class)
        for index in range(per_class):
            image = toy_set.draw(name, image_rng(seed, class_index, index), size)
            image.save(class_dir / f"{name}_{index:05d}.png", optimize=False)
        counts[name] = per_class
    return counts


@dataclass
class ToySetConfig:
    """The flags of a toy data set command; each command overrides `out` and `classes` for its own set."""

    out: str = option("data/toy", "output folder (ImageFolder layout: OUT/<class>/*.png)")
    per_class: int = option(200, "images per class")
    size: int = option(64, "image side in pixels")
    seed: int = option(0, "random seed; the same seed gives byte-identical images")
    classes: list[str] = option([], "classes to draw; empty = all")


def generate_and_report(toy_set: ToySet, cfg: ToySetConfig) -> dict[str, int]:
    """The commands' main: generate, then print one summary line."""
    start = time.perf_counter()
    counts = generate(toy_set, Path(cfg.out), cfg.per_class, cfg.size, cfg.seed, cfg.classes or None)
    print(
        f"{toy_set.item}s: {sum(counts.values())} images ({len(counts)} classes x {cfg.per_class}, {cfg.size}px, "
        f"seed {cfg.seed}) -> {cfg.out} in {time.perf_counter() - start:.1f}s"
    )
    return counts


# ----------------------------------------------------------------------------------------------------------
# Drawing that does not depend on the class
# ----------------------------------------------------------------------------------------------------------


def gradient_background(rng: np.random.Generator, size: int, canvas: int) -> Image.Image:
    """A two-colour linear gradient in a random direction (muted colours, as in a room).

    Computed at the output size and blown up into SUPERSAMPLE-wide blocks, which the final box
    downscale averages back to exactly these pixels: far cheaper than a full-size ramp.
    """
    colours = [
        np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.1, 0.55), rng.uniform(0.35, 0.85))) * 255
        for _ in range(2)
    ]
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size] / size - 0.5
    ramp = np.clip((xs * math.cos(angle) + ys * math.sin(angle)) * 1.4 + 0.5, 0, 1)[..., None]
    pixels = colours[0] * (1 - ramp) + colours[1] * ramp
    return Image.fromarray(pixels.astype(np.uint8), "RGB").resize((canvas, canvas), Image.Resampling.NEAREST)


def _light(pixels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Overall brightness, a soft directional light, and a little sensor noise."""
    size = pixels.shape[0]
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size] / size - 0.5
    shade = rng.uniform(0.88, 1.12) + rng.uniform(0.0, 0.25) * (xs * math.cos(angle) + ys * math.sin(angle))
    noisy = pixels * shade[..., None] + rng.normal(0.0, 3.0, pixels.shape)
    return np.clip(noisy, 0, 255).astype(np.uint8)


def finish(canvas_image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """Box-downscale the supersampled canvas to size x size (= area average), then light it."""
    small = canvas_image.resize((size, size), Image.Resampling.BOX)
    return Image.fromarray(_light(np.asarray(small, dtype=np.float32), rng), "RGB")
