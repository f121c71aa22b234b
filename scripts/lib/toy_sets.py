"""What the built-in toy data sets (make_toy_cats.py, make_toy_glyphs.py) share: the generate loop with its checks,
the command's flags and summary line, and the drawing that is not about a class (background, lighting, supersampling).
Each image's randomness comes from a generator seeded by (seed, class index, image index): the same seed gives
identical bytes, and changing --per-class or --classes leaves every other image unchanged."""

from __future__ import annotations

import colorsys
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from scripts.lib.cli import UserError, option, refuse_foreign_classes

# Shapes are drawn at SUPERSAMPLE x the output size and box-downscaled, so edges are anti-aliased.
SUPERSAMPLE = 4
RGB = tuple[int, int, int]
OUT_HELP = "output folder (ImageFolder layout: OUT/<class>/*.png)"


@dataclass
class ToySetConfig:
    """The flags every toy data set command has; each command adds its own `out` and `classes`."""

    per_class: int = option(200, "images per class")
    size: int = option(64, "image side in pixels")
    seed: int = option(0, "random seed; the same seed gives byte-identical images")


@dataclass(frozen=True)
class ToySet:
    """A built-in data set: its classes, in the order that seeds the images, and `draw(class_name, rng, size)`,
    which returns one size x size RGB image and takes every random number from rng."""

    item: str  # what one image shows, for messages: "toy cat"
    classes: tuple[str, ...]
    draw: Callable[[str, np.random.Generator, int], Image.Image]

    def generate(
        self, out: str | Path, per_class: int, size: int, seed: int, classes: Sequence[str] | None = None
    ) -> dict[str, int]:
        """Write `out/<class>/<class>_00000.png` ... and return the number of images per class."""
        chosen = list(classes) if classes else list(self.classes)
        if unknown := sorted(set(chosen) - set(self.classes)):
            raise UserError(f"unknown {self.item} class(es) {unknown} — choose from {', '.join(self.classes)}")
        if per_class < 1 or size < 8:
            raise UserError(f"--per-class must be >= 1 and --size >= 8 (got {per_class}, {size})")
        refuse_foreign_classes(Path(out), self.classes)
        for name in chosen:
            class_dir = Path(out) / name
            class_dir.mkdir(parents=True, exist_ok=True)
            for path in class_dir.glob(f"{name}_*.png"):  # ours, left by an earlier run with a larger --per-class
                index = path.stem[len(name) + 1 :]
                if index.isdigit() and int(index) >= per_class:
                    path.unlink()
            for index in range(per_class):
                rng = np.random.default_rng([seed, self.classes.index(name), index])
                self.draw(name, rng, size).save(class_dir / f"{name}_{index:05d}.png", optimize=False)
        return dict.fromkeys(chosen, per_class)

    def main(self, cfg: ToySetConfig) -> dict[str, int]:
        start = time.perf_counter()
        counts = self.generate(cfg.out, cfg.per_class, cfg.size, cfg.seed, cfg.classes)
        print(
            f"{self.item}s: {sum(counts.values())} images ({len(counts)} classes x {cfg.per_class}, {cfg.size}px, "
            f"seed {cfg.seed}) -> {cfg.out} in {time.perf_counter() - start:.1f}s"
        )
        return counts


def gradient_background(rng: np.random.Generator, size: int, canvas: int) -> Image.Image:
    """A canvas x canvas two-colour gradient in a random direction (muted, as in a room), computed cheaply at the
    output size and blown up into SUPERSAMPLE-wide blocks, which the final box downscale averages back exactly."""
    colours = [
        np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.1, 0.55), rng.uniform(0.35, 0.85))) * 255
        for _ in range(2)
    ]
    ramp = np.clip(_directional_ramp(rng, size) * 1.4 + 0.5, 0, 1)[..., None]
    pixels = colours[0] * (1 - ramp) + colours[1] * ramp
    return Image.fromarray(pixels.astype(np.uint8), "RGB").resize((canvas, canvas), Image.Resampling.NEAREST)


def _directional_ramp(rng: np.random.Generator, size: int) -> np.ndarray:
    """Each pixel's position along a random direction, centred on the picture (-0.7 .. 0.7)."""
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:size, 0:size] / size - 0.5
    return xs * math.cos(angle) + ys * math.sin(angle)


def finish(canvas_image: Image.Image, size: int, rng: np.random.Generator) -> Image.Image:
    """Box-downscale the supersampled canvas to size x size (= area average), then light it: overall brightness,
    a soft directional light, and a little sensor noise."""
    pixels = np.asarray(canvas_image.resize((size, size), Image.Resampling.BOX), dtype=np.float32)
    ramp = _directional_ramp(rng, size)
    shade = rng.uniform(0.88, 1.12) + rng.uniform(0.0, 0.25) * ramp
    noisy = pixels * shade[..., None] + rng.normal(0.0, 3.0, pixels.shape)
    return Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8), "RGB")
