"""Draw the built-in "toy cats" data set, so everything runs offline.

Six classes that differ the way breeds do — coat colour and pattern — while every picture varies in what a model
should learn to ignore: position, scale, head tilt, ear shape, eye colour, background and lighting.

    python scripts/make_toy_cats.py --out data/cats --per-class 200 --size 64
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from scripts.lib.cli import option, run_main
from scripts.lib.toy_sets import OUT_HELP, RGB, SUPERSAMPLE, ToySet, ToySetConfig, finish, gradient_background


class Coat(NamedTuple):
    base: RGB
    pattern: str  # "solid" | "stripes" | "patches" | "points"
    marking: RGB  # stripe / point colour (unused for solid)
    eyes: tuple[RGB, ...]
    nose: RGB
    whiskers: RGB
    inner_ear: RGB


_WARM_EYES = ((215, 175, 40), (225, 140, 30), (110, 175, 60), (200, 110, 40))  # gold, amber, green, copper
_BLUE_EYES = ((70, 140, 230), (40, 100, 210), (110, 170, 235))
_PINK, _PALE_PINK, _NONE = (225, 140, 150), (240, 170, 180), (0, 0, 0)

# What makes each class (fur colour and pattern, the breed's range of eye colours), in the order that seeds the images.
COATS = {
    "black": Coat((28, 26, 30), "solid", _NONE, _WARM_EYES, (70, 55, 60), (200, 200, 200), (90, 60, 70)),
    "white": Coat((240, 238, 232), "solid", _NONE, (_BLUE_EYES[0], *_WARM_EYES), _PINK, (160, 160, 160), _PALE_PINK),
    "orange_tabby": Coat(
        (226, 142, 62), "stripes", (160, 78, 28), _WARM_EYES, (210, 110, 100), (245, 235, 220), (235, 160, 150)
    ),
    "grey_tabby": Coat(
        (135, 135, 140), "stripes", (55, 55, 62), _WARM_EYES, (160, 95, 100), (235, 235, 235), (210, 150, 155)
    ),
    "calico": Coat((238, 234, 226), "patches", _NONE, _WARM_EYES, _PINK, (150, 150, 150), _PALE_PINK),
    "siamese": Coat((236, 222, 192), "points", (68, 48, 38), _BLUE_EYES, (80, 55, 50), (225, 225, 225), (120, 90, 85)),
}


def _calico_colours(rng: np.random.Generator) -> list[RGB]:
    """Orange, black, orange, ... from a random start: a calico always shows both, never one alone."""
    orange, black = (222, 130, 50), (30, 28, 32)
    return [orange, black] * 3 if rng.integers(2) == 0 else [black, orange] * 3


def _jitter(colour: RGB, rng: np.random.Generator, amount: float) -> RGB:
    """The same hue a little lighter or darker, plus a small per-channel wobble (no two cats identical)."""
    scale = rng.uniform(1 - amount, 1 + amount)
    return tuple(int(np.clip(c * scale + rng.normal(0, 4), 0, 255)) for c in colour)  # type: ignore[return-value]


class Head:
    """Where the head sits, how it is held and what its face looks like (all drawn from rng), and the map from
    head coordinates (unit = head radius r, origin = head centre, y down) through the head's tilt to the canvas."""

    def __init__(self, rng: np.random.Generator, canvas: int):
        self.canvas = canvas  # the supersampled picture's side
        self.r = rng.uniform(0.16, 0.25) * canvas
        # Keep the ear tips inside the picture: they reach about 1.9 head radii above the head centre.
        self.cy = rng.uniform(1.9 * self.r + 0.03 * canvas, 0.56 * canvas)
        self.cx = rng.uniform(0.3, 0.7) * canvas
        tilt = rng.normal(0.0, 0.16)
        self.cos, self.sin = math.cos(tilt), math.sin(tilt)
        self.ear_height = rng.uniform(0.6, 0.9)
        self.ear_width = rng.uniform(0.3, 0.42)  # half-width of the ear base
        self.ear_spread = rng.uniform(0.45, 0.75)  # angle of the ear from vertical, radians
        self.eye_open = rng.uniform(0.55, 1.0)  # eye height / eye width
        self.pupil = rng.uniform(0.03, 0.1)  # pupil half-width
        self.body_dx = rng.uniform(-0.35, 0.35)  # body offset from the head
        self.tail_side = int(rng.choice((-1, 1)))

    def pt(self, x: float, y: float) -> tuple[float, float]:
        return (self.cx + self.r * (x * self.cos - y * self.sin), self.cy + self.r * (x * self.sin + y * self.cos))

    def ellipse(self, x: float, y: float, rx: float, ry: float, n: int = 28) -> list[tuple[float, float]]:
        """A tilted ellipse as a polygon (ImageDraw.ellipse cannot rotate)."""
        angles = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
        return [self.pt(x + rx * math.cos(a), y + ry * math.sin(a)) for a in angles]

    def ear(self, side: int, inset: float = 0.0) -> list[tuple[float, float]]:
        """One triangular ear; `inset` > 0 shrinks it towards its centre (the pink inner ear)."""
        angle = side * self.ear_spread
        # Ear base sits on the head outline, tip points outwards along the same direction.
        bx, by = math.sin(angle) * 0.8, -math.cos(angle) * 0.8
        tx, ty = math.sin(angle) * (1.0 + self.ear_height), -math.cos(angle) * (1.0 + self.ear_height)
        px, py = math.cos(angle) * self.ear_width, math.sin(angle) * self.ear_width
        corners = [(bx - px, by - py), (tx, ty), (bx + px, by + py)]
        if inset:
            mx, my = sum(c[0] for c in corners) / 3, sum(c[1] for c in corners) / 3
            corners = [(mx + (x - mx) * (1 - inset), my + (y - my) * (1 - inset) + inset * 0.15) for x, y in corners]
        return [self.pt(x, y) for x, y in corners]


class Body:
    """The sitting body (an ellipse), its tail (a quadratic Bezier curve) and two front paws, in canvas pixels."""

    def __init__(self, head: Head, rng: np.random.Generator):
        r, side = head.r, head.tail_side
        cx, cy = head.cx + head.body_dx * r, head.cy + rng.uniform(1.35, 1.6) * r
        rx, ry = rng.uniform(0.95, 1.2) * r, rng.uniform(1.15, 1.4) * r
        self.cx, self.cy, self.rx, self.ry = cx, cy, rx, ry
        p0 = np.array((cx + side * 0.75 * rx, cy + 0.6 * ry))  # start, control point, end
        p1 = np.array((cx + side * rng.uniform(1.5, 1.9) * rx, cy + 0.5 * ry))
        p2 = np.array((cx + side * rng.uniform(1.3, 1.7) * rx, cy - rng.uniform(0.1, 0.6) * ry))
        self.tail = [tuple((1 - t) ** 2 * p0 + 2 * (1 - t) * t * p1 + t**2 * p2) for t in np.linspace(0.0, 1.0, 12)]
        paw_y, paw_r = cy + 0.92 * ry, 0.26 * r
        self.paws = [
            (cx + dx * rx - paw_r, paw_y - paw_r * 0.8, cx + dx * rx + paw_r, paw_y + paw_r * 0.8) for dx in (-0.4, 0.4)
        ]
        self.tail_width = max(2, int(rng.uniform(0.24, 0.32) * r))


def _head_markings(draw: ImageDraw.ImageDraw, head: Head, coat: Coat, rng: np.random.Generator) -> None:
    """Stripes or patches on the head layer (clipped to the head outline later)."""
    if coat.pattern == "stripes":
        forehead = [[head.pt(x, -1.1), head.pt(x * 0.8, -0.45)] for x in (-0.32, 0.0, 0.32)]
        cheeks = [[head.pt(s * 1.1, y), head.pt(s * 0.62, y + 0.08)] for s in (-1, 1) for y in (0.05, 0.35)]
        for line in forehead + cheeks:
            draw.line(line, fill=coat.marking, width=max(2, int(head.r * 0.14)), joint="curve")
    elif coat.pattern == "patches":
        # One big patch over an eye/ear and one smaller elsewhere: a calico head is never plain white.
        side = rng.choice((-1, 1))
        first, second = _calico_colours(rng)[:2]
        draw.polygon(head.ellipse(side * 0.55, -0.5, rng.uniform(0.5, 0.7), rng.uniform(0.45, 0.65)), fill=first)
        small = head.ellipse(-side * 0.6, rng.uniform(-0.7, 0.1), rng.uniform(0.3, 0.45), rng.uniform(0.3, 0.45))
        draw.polygon(small, fill=second)


def _body_markings(draw: ImageDraw.ImageDraw, body: Body, coat: Coat, rng: np.random.Generator) -> None:
    """Stripes / patches on the body + tail layer; horizontal bands become rings on the upright tail."""
    if coat.pattern == "stripes":
        step = body.ry * rng.uniform(0.28, 0.34)
        top, bottom = body.cy - 2.2 * body.ry, body.cy + body.ry
        x0, x1 = body.cx - 3 * body.rx, body.cx + 3 * body.rx
        bend, width = rng.uniform(0.1, 0.25) * body.ry, max(2, int(body.rx * 0.13))
        for y in np.arange(top, bottom, step):
            draw.line([(x0, y), (body.cx, y + bend), (x1, y)], fill=coat.marking, width=width, joint="curve")
    elif coat.pattern == "patches":
        colours = _calico_colours(rng)
        for colour in colours[: int(rng.integers(3, 6))]:
            x = body.cx + rng.uniform(-1.0, 1.0) * body.rx
            y = body.cy + rng.uniform(-0.9, 0.6) * body.ry
            rx, ry = rng.uniform(0.3, 0.6) * body.rx, rng.uniform(0.25, 0.5) * body.ry
            draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=colour)
        draw.line(body.tail[len(body.tail) // 2 :], fill=colours[-1], width=body.tail_width * 2)


def _draw_coat(head: Head, body: Body, coat: Coat, rng: np.random.Generator) -> tuple[Image.Image, Image.Image]:
    """The fur (RGB) and the silhouette (L): head and body are separate layers, so body stripes never cross the face."""
    size = (head.canvas, head.canvas)

    def mask(polygons: list, boxes: list, tail_width: int = 0) -> Image.Image:  # 255 inside every shape
        layer = Image.new("L", size, 0)
        draw = ImageDraw.Draw(layer)
        for polygon in polygons:
            draw.polygon(polygon, fill=255)
        for box in boxes:
            draw.ellipse(box, fill=255)
        if tail_width:
            draw.line(body.tail, fill=255, width=tail_width, joint="curve")
        return layer

    coat = coat._replace(base=_jitter(coat.base, rng, 0.08), marking=_jitter(coat.marking, rng, 0.1))
    fur, head_fur = Image.new("RGB", size, coat.base), Image.new("RGB", size, coat.base)
    _body_markings(ImageDraw.Draw(fur), body, coat, rng)
    _head_markings(ImageDraw.Draw(head_fur), head, coat, rng)
    ears = [head.ear(side) for side in (-1, 1)]
    head_mask = mask([head.ellipse(0.0, 0.0, 1.05, 0.95, n=40), *ears], [])
    body_box = (body.cx - body.rx, body.cy - body.ry, body.cx + body.rx, body.cy + body.ry)
    silhouette = mask([], [body_box, *body.paws], body.tail_width)
    fur.paste(head_fur, mask=head_mask)
    silhouette.paste(255, mask=head_mask)
    if coat.pattern == "points":  # Siamese: ears, face mask, paws and tail, blurred to fade into the cream coat
        points = mask([*ears, head.ellipse(0.0, 0.25, 0.55, 0.6)], body.paws, body.tail_width + 2)
        fur.paste(Image.new("RGB", size, coat.marking), mask=points.filter(ImageFilter.GaussianBlur(head.r * 0.12)))
    return fur, silhouette


def _draw_face(draw: ImageDraw.ImageDraw, head: Head, coat: Coat, rng: np.random.Generator) -> None:
    """Inner ears, eyes with slit pupils and a highlight, nose, mouth and whiskers."""
    for side in (-1, 1):
        draw.polygon(head.ear(side, inset=0.45), fill=_jitter(coat.inner_ear, rng, 0.05))
    iris = _jitter(coat.eyes[int(rng.integers(len(coat.eyes)))], rng, 0.1)
    eye_w, eye_y = rng.uniform(0.19, 0.24), rng.uniform(-0.12, 0.0)
    eye_h = eye_w * head.eye_open
    for side in (-1, 1):
        ex = side * rng.uniform(0.36, 0.42)
        draw.polygon(head.ellipse(ex, eye_y, eye_w + 0.03, eye_h + 0.03), fill=(20, 18, 20))
        draw.polygon(head.ellipse(ex, eye_y, eye_w, eye_h), fill=iris)
        draw.polygon(head.ellipse(ex, eye_y, head.pupil, eye_h * 0.9, n=16), fill=(10, 10, 12))
        draw.polygon(head.ellipse(ex + 0.06, eye_y - 0.06, 0.045, 0.045, n=10), fill=(250, 250, 250))
    draw.polygon([head.pt(-0.13, 0.22), head.pt(0.13, 0.22), head.pt(0.0, 0.36)], fill=coat.nose)
    mouth = {"fill": (40, 30, 30), "width": max(1, int(head.r * 0.04))}
    draw.line([head.pt(0.0, 0.36), head.pt(0.0, 0.45)], **mouth)
    for side in (-1, 1):
        draw.line([head.pt(0.0, 0.45), head.pt(side * 0.12, 0.52), head.pt(side * 0.22, 0.47)], **mouth, joint="curve")
        for droop in (-0.12, 0.0, 0.12):
            whisker_end = head.pt(side * 1.25, 0.3 + droop * 2 + rng.normal(0, 0.03))
            draw.line([head.pt(side * 0.3, 0.38), whisker_end], fill=coat.whiskers, width=max(1, int(head.r * 0.025)))


def draw_toy_cat(class_name: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One size x size RGB picture of a cat of `class_name`, all randomness drawn from `rng`."""
    coat, canvas = COATS[class_name], size * SUPERSAMPLE
    head = Head(rng, canvas)
    body = Body(head, rng)
    image = gradient_background(rng, size, canvas)
    fur, silhouette = _draw_coat(head, body, coat, rng)
    image.paste(fur, mask=silhouette)
    _draw_face(ImageDraw.Draw(image), head, coat, rng)
    return finish(image, size, rng)


TOY_CATS = ToySet("toy cat", tuple(COATS), draw_toy_cat)
TOY_CAT_CLASSES, generate_toy_cats, main = TOY_CATS.classes, TOY_CATS.generate, TOY_CATS.main


@dataclass
class ToyCatsConfig(ToySetConfig):
    out: str = option("data/cats", OUT_HELP)
    classes: list[str] = option([], f"classes to draw; empty = all of {', '.join(TOY_CAT_CLASSES)}")


if __name__ == "__main__":
    run_main(main, ToyCatsConfig, "Draw the built-in toy cats data set (offline, deterministic).")
