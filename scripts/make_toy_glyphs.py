"""Draw the built-in "toy glyphs" data set: ten classes that only orientation tells apart.

b, d, p and q are one stem-and-bowl shape in four orientations, arrow_left and arrow_right one arrow in two, and L,
J, S and Z mirror into no class (MIRROR_OF): a model trained with horizontal flips learns the wrong thing (train with
`--augmentation-level none`). Colour carries no class information: every picture has its own stroke colour,
background and lighting, and varies in position, scale, stroke width, proportions and a small rotation.

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
from scripts.lib.toy_sets import OUT_HELP, RGB, SUPERSAMPLE, ToySet, ToySetConfig, finish, gradient_background

Stroke = list[tuple[float, float]]
# The largest tilt, in radians (~11 degrees): small enough that b never turns into q or p.
MAX_ROTATION = 0.2
# Minimum luma difference (0..1) between stroke and background: every glyph stays easy to see.
MIN_CONTRAST = 0.35
LUMA = np.array([0.299, 0.587, 0.114])


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
    tip, back = 0.95 * direction, (0.95 - head) * direction
    return [[(-tip, 0.0), (tip, 0.0)], [(back, -spread), (tip, 0.0), (back, spread)]]


def _letter_l(rng: np.random.Generator) -> list[Stroke]:
    foot = rng.uniform(0.45, 0.65)
    return [[(-foot, -1.0), (-foot, 1.0), (foot, 1.0)]]


def _letter_j(rng: np.random.Generator) -> list[Stroke]:
    """A top bar, a stem on the right and a hook curling to the left (mirrored: a hook to the right)."""
    hook_rx, hook_ry = rng.uniform(0.35, 0.5), rng.uniform(0.35, 0.5)
    stem_x, hook_y = 0.4, 1 - hook_ry
    bar = [(stem_x - rng.uniform(0.45, 0.6), -1.0), (stem_x + rng.uniform(0.3, 0.45), -1.0)]
    return [bar, [(stem_x, -1.0), (stem_x, hook_y), *_arc(stem_x - hook_rx, hook_y, hook_rx, hook_ry, 0, 170)]]


def _letter_s(rng: np.random.Generator) -> list[Stroke]:
    """Two arcs: the upper one opens to the right, the lower one to the left."""
    rx, open_angle = rng.uniform(0.45, 0.6), rng.uniform(20, 45)
    upper = _arc(0.0, -0.5, rx, 0.5, -open_angle, -270)
    lower = _arc(0.0, 0.5, rx, 0.5, -90, 180 - open_angle)
    return [upper + lower[1:]]


def _letter_z(rng: np.random.Generator) -> list[Stroke]:
    half = rng.uniform(0.5, 0.7)
    return [[(-half, -1.0), (half, -1.0), (-half, 1.0), (half, 1.0)]]


# Each class's strokes in glyph units (x, y within about [-1, 1], y down), in the order that seeds the images.
GLYPH_STROKES = {
    "b": partial(_stem_and_bowl, -1, True), "d": partial(_stem_and_bowl, 1, True),
    "p": partial(_stem_and_bowl, -1, False), "q": partial(_stem_and_bowl, 1, False),
    "arrow_left": partial(_arrow, -1), "arrow_right": partial(_arrow, 1),
    "L": _letter_l, "J": _letter_j, "S": _letter_s, "Z": _letter_z,
}  # fmt: skip
# What a left-right mirror turns each class into (None: into no class at all).
MIRROR_OF = dict(b="d", d="b", p="q", q="p", arrow_left="arrow_right", arrow_right="arrow_left",
                 L=None, J=None, S=None, Z=None)  # fmt: skip


def _place(strokes: list[Stroke], rng: np.random.Generator, canvas: int, margin: float) -> list[Stroke]:
    """Scale, stretch and tilt the glyph, then put it anywhere it fits inside the picture."""
    scale, stretch = rng.uniform(0.30, 0.40) * canvas, rng.uniform(0.85, 1.15)
    angle = float(np.clip(rng.normal(0.0, 0.1), -MAX_ROTATION, MAX_ROTATION))
    cos, sin = math.cos(angle), math.sin(angle)
    placed = [
        [(scale * (x * stretch * cos - y * sin), scale * (x * stretch * sin + y * cos)) for x, y in s] for s in strokes
    ]
    xs, ys = np.array([p[0] for s in placed for p in s]), np.array([p[1] for s in placed for p in s])
    dx = rng.uniform(margin - xs.min(), max(margin - xs.min(), canvas - margin - xs.max()))
    dy = rng.uniform(margin - ys.min(), max(margin - ys.min(), canvas - margin - ys.max()))
    return [[(x + dx, y + dy) for x, y in stroke] for stroke in placed]


def _stroke_colour(background: Image.Image, rng: np.random.Generator) -> RGB:
    """Any hue, but far enough in brightness from the background to be read at a glance."""
    background_luma = np.asarray(background, dtype=np.float64).reshape(-1, 3).mean(axis=0) @ LUMA / 255
    for _ in range(20):
        colour = np.array(colorsys.hsv_to_rgb(rng.uniform(0, 1), rng.uniform(0.0, 0.9), rng.uniform(0.0, 1.0))) * 255
        if abs(colour @ LUMA / 255 - background_luma) >= MIN_CONTRAST:
            return tuple(int(c) for c in colour)  # type: ignore[return-value]
    # A mid-grey background can leave few colours: fall back to black or white, whichever is further.
    return (0, 0, 0) if background_luma > 0.5 else (255, 255, 255)


def draw_toy_glyph(class_name: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One size x size RGB picture of glyph `class_name`, all randomness drawn from `rng`."""
    canvas = size * SUPERSAMPLE
    image = gradient_background(rng, size, canvas)
    colour = _stroke_colour(image, rng)
    # Strokes scale with the picture, not the glyph: 2.4-3.5 px at 32 px. Bold on purpose: with 1-2 px strokes a T/4
    # DiT reached only 67 % class fidelity in `make quality`, drawing the strokes as broken dashes.
    width = max(SUPERSAMPLE, int(rng.uniform(0.075, 0.11) * canvas))
    strokes = _place(GLYPH_STROKES[class_name](rng), rng, canvas, margin=width / 2 + SUPERSAMPLE)
    draw = ImageDraw.Draw(image)
    for stroke in strokes:
        draw.line(stroke, fill=colour, width=width, joint="curve")
        for x, y in (stroke[0], stroke[-1]):  # round caps
            draw.ellipse((x - width / 2, y - width / 2, x + width / 2, y + width / 2), fill=colour)
    return finish(image, size, rng)


TOY_GLYPHS = ToySet("toy glyph", tuple(GLYPH_STROKES), draw_toy_glyph)
TOY_GLYPH_CLASSES, generate_toy_glyphs, main = TOY_GLYPHS.classes, TOY_GLYPHS.generate, TOY_GLYPHS.main


@dataclass
class ToyGlyphsConfig(ToySetConfig):
    out: str = option("data/glyphs", OUT_HELP)
    classes: list[str] = option([], f"classes to draw; empty = all of {', '.join(TOY_GLYPH_CLASSES)}")


if __name__ == "__main__":
    description = "Draw the toy glyphs data set (offline, deterministic): ten classes told apart only by orientation."
    run_main(main, ToyGlyphsConfig, description)
