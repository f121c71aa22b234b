"""Draw the built-in "toy glyphs" data set: ten classes that only orientation tells apart.

b, d, p and q are one shape (a stem and a bowl) in four orientations, arrow_left and arrow_right one
arrow in two; L, J, S and Z turn into shapes of no class when mirrored. A left-right mirror therefore
turns b <-> d, p <-> q and arrow_left <-> arrow_right and the rest into nonsense: a model trained with
horizontal flips learns the wrong thing (train with `--augmentation-level none`). Colour carries no class
information: every picture has its own stroke colour, background gradient and lighting, and varies in
position, scale, stroke width, proportions and a small rotation. Strokes are drawn with PIL at SUPERSAMPLE x
the image size and box-downscaled (anti-aliased); each image's randomness comes from a generator seeded by
(seed, class index, image index), as for the toy cats.

    python scripts/make_toy_glyphs.py --out data/glyphs --per-class 200 --size 32
"""

from __future__ import annotations

import colorsys
import math
from dataclasses import dataclass
from functools import partial

import numpy as np
from PIL import Image, ImageDraw

from scripts.lib.cli import option, run_main
from scripts.lib.toy_sets import (
    RGB,
    SUPERSAMPLE,
    ToySet,
    ToySetConfig,
    finish,
    generate,
    generate_and_report,
    gradient_background,
)

TOY_GLYPH_CLASSES = ("b", "d", "p", "q", "arrow_left", "arrow_right", "L", "J", "S", "Z")
# What a left-right mirror turns each class into (None: into no class at all).
MIRROR_OF = {
    "b": "d",
    "d": "b",
    "p": "q",
    "q": "p",
    "arrow_left": "arrow_right",
    "arrow_right": "arrow_left",
    "L": None,
    "J": None,
    "S": None,
    "Z": None,
}

Point = tuple[float, float]
Stroke = list[Point]
# The largest tilt, in radians (~11 degrees): small enough that b never turns into q or p.
MAX_ROTATION = 0.2
# Minimum luma difference (0..1) between stroke and background: every glyph stays easy to see.
MIN_CONTRAST = 0.35


def _arc(cx: float, cy: float, rx: float, ry: float, start: float, end: float, n: int = 24) -> Stroke:
    """Points of an elliptic arc from angle `start` to `end` in degrees (y points down: 90 is the bottom)."""
    angles = np.radians(np.linspace(start, end, n))
    return [(cx + rx * math.cos(a), cy + ry * math.sin(a)) for a in angles]


def _stem_and_bowl(stem_side: int, bowl_low: bool, rng: np.random.Generator) -> list[Stroke]:
    """b (stem left, bowl low), d (right, low), p (left, high), q (right, high): one shape, four ways round."""
    rx, ry = rng.uniform(0.45, 0.62), rng.uniform(0.42, 0.56)
    bowl_y = 1 - ry if bowl_low else -1 + ry
    return [[(stem_side * rx, -1.0), (stem_side * rx, 1.0)], _arc(0.0, bowl_y, rx, ry, 0, 360, n=32)]


def _arrow(direction: int, rng: np.random.Generator) -> list[Stroke]:
    """A shaft and an open head pointing left (-1) or right (+1)."""
    head, spread = rng.uniform(0.4, 0.6), rng.uniform(0.35, 0.55)
    tip = 0.95 * direction
    return [
        [(-tip, 0.0), (tip, 0.0)],
        [(tip - direction * head, -spread), (tip, 0.0), (tip - direction * head, spread)],
    ]


def _letter_l(rng: np.random.Generator) -> list[Stroke]:
    foot = rng.uniform(0.45, 0.65)
    return [[(-foot, -1.0), (-foot, 1.0), (foot, 1.0)]]


def _letter_j(rng: np.random.Generator) -> list[Stroke]:
    """A top bar, a stem on the right and a hook curling to the left (mirrored: a hook to the right)."""
    hook_rx, hook_ry = rng.uniform(0.35, 0.5), rng.uniform(0.35, 0.5)
    stem_x, hook_y = 0.4, 1 - hook_ry
    return [
        [(stem_x - rng.uniform(0.45, 0.6), -1.0), (stem_x + rng.uniform(0.3, 0.45), -1.0)],
        [(stem_x, -1.0), (stem_x, hook_y), *_arc(stem_x - hook_rx, hook_y, hook_rx, hook_ry, 0, 170)],
    ]


def _letter_s(rng: np.random.Generator) -> list[Stroke]:
    """Two arcs: the upper one opens to the right, the lower one to the left."""
    rx, open_angle = rng.uniform(0.45, 0.6), rng.uniform(20, 45)
    upper = _arc(0.0, -0.5, rx, 0.5, -open_angle, -270)
    lower = _arc(0.0, 0.5, rx, 0.5, -90, 180 - open_angle)
    return [upper + lower[1:]]


def _letter_z(rng: np.random.Generator) -> list[Stroke]:
    half = rng.uniform(0.5, 0.7)
    return [[(-half, -1.0), (half, -1.0), (-half, 1.0), (half, 1.0)]]


def glyph_strokes(class_name: str, rng: np.random.Generator) -> list[Stroke]:
    """The class's strokes in glyph units: x and y within about [-1, 1], y pointing down."""
    shapes = {
        "b": lambda: _stem_and_bowl(-1, True, rng),
        "d": lambda: _stem_and_bowl(1, True, rng),
        "p": lambda: _stem_and_bowl(-1, False, rng),
        "q": lambda: _stem_and_bowl(1, False, rng),
        "arrow_left": lambda: _arrow(-1, rng),
        "arrow_right": lambda: _arrow(1, rng),
        "L": lambda: _letter_l(rng),
        "J": lambda: _letter_j(rng),
        "S": lambda: _letter_s(rng),
        "Z": lambda: _letter_z(rng),
    }
    return shapes[class_name]()


@dataclass(frozen=True)
class Placement:
    """Glyph units -> canvas pixels: stretch, rotate, scale, then move to (cx, cy)."""

    cx: float
    cy: float
    scale: float  # canvas pixels per glyph unit
    stretch: float  # extra horizontal scale
    angle: float  # radians

    def transform(self, x: float, y: float) -> Point:
        x *= self.stretch
        cos, sin = math.cos(self.angle), math.sin(self.angle)
        return (self.cx + self.scale * (x * cos - y * sin), self.cy + self.scale * (x * sin + y * cos))


def _place(strokes: list[Stroke], rng: np.random.Generator, canvas: int, margin: float) -> list[Stroke]:
    """Scale, stretch and tilt the glyph, then put it anywhere it fits inside the picture."""
    scale = rng.uniform(0.30, 0.40) * canvas
    shape = Placement(
        0.0, 0.0, scale, rng.uniform(0.85, 1.15), float(np.clip(rng.normal(0.0, 0.1), -MAX_ROTATION, MAX_ROTATION))
    )
    placed = [[shape.transform(x, y) for x, y in stroke] for stroke in strokes]
    xs, ys = np.array([p[0] for s in placed for p in s]), np.array([p[1] for s in placed for p in s])
    dx = rng.uniform(margin - xs.min(), max(margin - xs.min(), canvas - margin - xs.max()))
    dy = rng.uniform(margin - ys.min(), max(margin - ys.min(), canvas - margin - ys.max()))
    return [[(x + dx, y + dy) for x, y in stroke] for stroke in placed]


def _luma(rgb: np.ndarray) -> float:
    return float(rgb @ np.array([0.299, 0.587, 0.114]) / 255)


def _stroke_colour(background: Image.Image, rng: np.random.Generator) -> RGB:
    """Any hue, but far enough in brightness from the background to be read at a glance."""
    background_luma = _luma(np.asarray(background, dtype=np.float64).reshape(-1, 3).mean(axis=0))
    colour = np.zeros(3)
    for _ in range(20):
        colour = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.0, 0.9), rng.uniform(0.0, 1.0))) * 255
        if abs(_luma(colour) - background_luma) >= MIN_CONTRAST:
            break
    else:  # a mid-grey background can leave few colours: fall back to black or white, whichever is further
        colour = np.full(3, 0.0 if background_luma > 0.5 else 255.0)
    return tuple(int(c) for c in colour)  # type: ignore[return-value]


def draw_toy_glyph(class_name: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One size x size RGB picture of glyph `class_name`, all randomness drawn from `rng`."""
    canvas = size * SUPERSAMPLE
    image = gradient_background(rng, size, canvas)
    colour = _stroke_colour(image, rng)
    # Strokes scale with the picture, not the glyph: 2.4-3.5 px at 32 px. Bold on purpose: with strokes of
    # 1-2 px (the first draft) a T/4 DiT reached only 67 % class fidelity in the 10-minute CPU budget of
    # `make quality`, drawing the backgrounds well and the strokes as broken dashes.
    width = max(SUPERSAMPLE, int(rng.uniform(0.075, 0.11) * canvas))
    strokes = _place(glyph_strokes(class_name, rng), rng, canvas, margin=width / 2 + SUPERSAMPLE)
    draw = ImageDraw.Draw(image)
    for stroke in strokes:
        draw.line(stroke, fill=colour, width=width, joint="curve")
        for x, y in (stroke[0], stroke[-1]):  # round caps
            draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=colour)
    return finish(image, size, rng)


TOY_GLYPHS = ToySet("toy glyph", TOY_GLYPH_CLASSES, draw_toy_glyph)


# generate_toy_glyphs(out, per_class, size, seed, classes=None) -> images per class, as toy_sets.generate
generate_toy_glyphs = partial(generate, TOY_GLYPHS)


@dataclass
class ToyGlyphsConfig(ToySetConfig):
    out: str = option("data/glyphs", "output folder (ImageFolder layout: OUT/<class>/*.png)")
    classes: list[str] = option([], f"classes to draw; empty = all of {', '.join(TOY_GLYPH_CLASSES)}")


def main(cfg: ToyGlyphsConfig) -> dict[str, int]:
    return generate_and_report(TOY_GLYPHS, cfg)


if __name__ == "__main__":
    run_main(
        main,
        ToyGlyphsConfig,
        "Draw the built-in toy glyphs data set (offline, deterministic): ten classes told apart only by orientation.",
    )
