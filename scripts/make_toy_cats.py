"""Draw the built-in "toy cats" data set, so everything runs offline.

Six classes that differ the way breeds do — coat colour and pattern — while every picture varies in
what a model should learn to ignore: position, scale, head tilt, ear shape, eye colour, background and
lighting. Each image is drawn with PIL at SUPERSAMPLE x its size and box-downscaled, so edges are
anti-aliased. Each image's randomness comes from a generator seeded by (seed, class index, image
index): the same seed gives identical bytes, and changing --per-class or --classes leaves every other
image unchanged.

    python scripts/make_toy_cats.py --out data/cats --per-class 200 --size 64
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from functools import partial

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

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

TOY_CAT_CLASSES = ("black", "white", "orange_tabby", "grey_tabby", "calico", "siamese")


@dataclass(frozen=True)
class Coat:
    """What makes a class: fur colour and pattern, and the breed's range of eye colours."""

    base: RGB
    pattern: str  # "solid" | "stripes" | "patches" | "points"
    marking: RGB  # stripe / point colour (unused for solid)
    eyes: tuple[RGB, ...]
    nose: RGB
    whiskers: RGB
    inner_ear: RGB


_GOLD, _AMBER, _GREEN, _COPPER = (215, 175, 40), (225, 140, 30), (110, 175, 60), (200, 110, 40)
_BLUE, _DEEP_BLUE, _PALE_BLUE = (70, 140, 230), (40, 100, 210), (110, 170, 235)
_PINK, _PALE_PINK = (225, 140, 150), (240, 170, 180)
_WARM_EYES = (_GOLD, _AMBER, _GREEN, _COPPER)

COATS: dict[str, Coat] = {
    "black": Coat(base=(28, 26, 30), pattern="solid", marking=(0, 0, 0), eyes=_WARM_EYES,
                  nose=(70, 55, 60), whiskers=(200, 200, 200), inner_ear=(90, 60, 70)),
    "white": Coat(base=(240, 238, 232), pattern="solid", marking=(0, 0, 0), eyes=(_BLUE, *_WARM_EYES),
                  nose=_PINK, whiskers=(160, 160, 160), inner_ear=_PALE_PINK),
    "orange_tabby": Coat(base=(226, 142, 62), pattern="stripes", marking=(160, 78, 28), eyes=_WARM_EYES,
                         nose=(210, 110, 100), whiskers=(245, 235, 220), inner_ear=(235, 160, 150)),
    "grey_tabby": Coat(base=(135, 135, 140), pattern="stripes", marking=(55, 55, 62), eyes=_WARM_EYES,
                       nose=(160, 95, 100), whiskers=(235, 235, 235), inner_ear=(210, 150, 155)),
    "calico": Coat(base=(238, 234, 226), pattern="patches", marking=(0, 0, 0), eyes=_WARM_EYES,
                   nose=_PINK, whiskers=(150, 150, 150), inner_ear=_PALE_PINK),
    "siamese": Coat(base=(236, 222, 192), pattern="points", marking=(68, 48, 38),
                    eyes=(_BLUE, _DEEP_BLUE, _PALE_BLUE), nose=(80, 55, 50), whiskers=(225, 225, 225),
                    inner_ear=(120, 90, 85)),
}  # fmt: skip
_CALICO_PATCHES = ((222, 130, 50), (30, 28, 32))


def _calico_colours(rng: np.random.Generator) -> list[RGB]:
    """Orange, black, orange, ... from a random start: a calico always shows both, never one alone."""
    start = int(rng.integers(2))
    return [_CALICO_PATCHES[(start + i) % 2] for i in range(6)]


@dataclass(frozen=True)
class Pose:
    """Where the cat sits and how it holds its head, in canvas pixels and head radii."""

    cx: float
    cy: float
    r: float  # head radius in canvas pixels
    tilt: float  # head rotation, radians
    ear_height: float  # in head radii
    ear_width: float  # half-width of the ear base, in head radii
    ear_spread: float  # angle of the ear from vertical, radians
    eye_open: float  # eye height / eye width
    pupil: float  # pupil half-width, in head radii
    body_dx: float  # body offset from the head, in head radii
    tail_side: int  # -1 left, +1 right


def _sample_pose(rng: np.random.Generator, canvas: int) -> Pose:
    r = rng.uniform(0.16, 0.25) * canvas
    # Keep the ear tips inside the picture: they reach about 1.9 head radii above the head centre.
    cy = rng.uniform(1.9 * r + 0.03 * canvas, 0.56 * canvas)
    return Pose(
        cx=rng.uniform(0.3, 0.7) * canvas,
        cy=cy,
        r=r,
        tilt=rng.normal(0.0, 0.16),
        ear_height=rng.uniform(0.6, 0.9),
        ear_width=rng.uniform(0.3, 0.42),
        ear_spread=rng.uniform(0.45, 0.75),
        eye_open=rng.uniform(0.55, 1.0),
        pupil=rng.uniform(0.03, 0.1),
        body_dx=rng.uniform(-0.35, 0.35),
        tail_side=int(rng.choice((-1, 1))),
    )


class HeadFrame:
    """Maps head coordinates (unit = head radius, origin = head centre, y down) through the head tilt."""

    def __init__(self, pose: Pose):
        self.pose = pose
        self.cos, self.sin = math.cos(pose.tilt), math.sin(pose.tilt)

    def pt(self, x: float, y: float) -> tuple[float, float]:
        p = self.pose
        return (p.cx + p.r * (x * self.cos - y * self.sin), p.cy + p.r * (x * self.sin + y * self.cos))

    def ellipse(self, x: float, y: float, rx: float, ry: float, n: int = 28) -> list[tuple[float, float]]:
        """A tilted ellipse as a polygon (ImageDraw.ellipse cannot rotate)."""
        angles = np.linspace(0.0, 2 * math.pi, n, endpoint=False)
        return [self.pt(x + rx * math.cos(a), y + ry * math.sin(a)) for a in angles]

    def ear(self, side: int, inset: float = 0.0) -> list[tuple[float, float]]:
        """One triangular ear; `inset` > 0 shrinks it towards its centre (the pink inner ear)."""
        p = self.pose
        base_angle = side * p.ear_spread
        # Ear base sits on the head outline, tip points outwards along the same direction.
        bx, by = math.sin(base_angle) * 0.8, -math.cos(base_angle) * 0.8
        tx, ty = math.sin(base_angle) * (1.0 + p.ear_height), -math.cos(base_angle) * (1.0 + p.ear_height)
        px, py = math.cos(base_angle) * p.ear_width, math.sin(base_angle) * p.ear_width
        corners = [(bx - px, by - py), (tx, ty), (bx + px, by + py)]
        if inset:
            mx, my = sum(c[0] for c in corners) / 3, sum(c[1] for c in corners) / 3
            corners = [(mx + (x - mx) * (1 - inset), my + (y - my) * (1 - inset) + inset * 0.15) for x, y in corners]
        return [self.pt(x, y) for x, y in corners]


@dataclass(frozen=True)
class Body:
    """The sitting body and tail, in canvas pixels."""

    cx: float
    cy: float
    rx: float
    ry: float
    tail: list[tuple[float, float]]
    tail_width: int
    paws: list[tuple[float, float, float, float]]


def _body_for(pose: Pose, rng: np.random.Generator) -> Body:
    r = pose.r
    cx, cy = pose.cx + pose.body_dx * r, pose.cy + rng.uniform(1.35, 1.6) * r
    rx, ry = rng.uniform(0.95, 1.2) * r, rng.uniform(1.15, 1.4) * r
    side = pose.tail_side
    start = (cx + side * 0.75 * rx, cy + 0.6 * ry)
    control = (cx + side * rng.uniform(1.5, 1.9) * rx, cy + 0.5 * ry)
    end = (cx + side * rng.uniform(1.3, 1.7) * rx, cy - rng.uniform(0.1, 0.6) * ry)
    tail = [_bezier(start, control, end, t) for t in np.linspace(0.0, 1.0, 12)]
    paw_y, paw_r = cy + 0.92 * ry, 0.26 * r
    paws = [
        (cx + dx * rx - paw_r, paw_y - paw_r * 0.8, cx + dx * rx + paw_r, paw_y + paw_r * 0.8) for dx in (-0.4, 0.4)
    ]
    return Body(cx, cy, rx, ry, tail, max(2, int(rng.uniform(0.24, 0.32) * r)), paws)


def _bezier(a: tuple[float, float], b: tuple[float, float], c: tuple[float, float], t: float) -> tuple[float, float]:
    return (
        (1 - t) ** 2 * a[0] + 2 * (1 - t) * t * b[0] + t**2 * c[0],
        (1 - t) ** 2 * a[1] + 2 * (1 - t) * t * b[1] + t**2 * c[1],
    )


def _jitter(colour: RGB, rng: np.random.Generator, amount: float) -> RGB:
    """The same hue a little lighter or darker, plus a small per-channel wobble (no two cats identical)."""
    scale = rng.uniform(1 - amount, 1 + amount)
    return tuple(int(np.clip(c * scale + rng.normal(0, 4), 0, 255)) for c in colour)  # type: ignore[return-value]


def _stripes(draw: ImageDraw.ImageDraw, lines: list[list[tuple[float, float]]], colour: RGB, width: int) -> None:
    for line in lines:
        draw.line(line, fill=colour, width=width, joint="curve")


def _head_markings(draw: ImageDraw.ImageDraw, head: HeadFrame, coat: Coat, rng: np.random.Generator) -> None:
    """Stripes or patches on the head layer (clipped to the head outline later)."""
    width = max(2, int(head.pose.r * 0.14))
    if coat.pattern == "stripes":
        forehead = [[head.pt(x, -1.1), head.pt(x * 0.8, -0.45)] for x in (-0.32, 0.0, 0.32)]
        cheeks = [[head.pt(s * 1.1, y), head.pt(s * 0.62, y + 0.08)] for s in (-1, 1) for y in (0.05, 0.35)]
        _stripes(draw, forehead + cheeks, coat.marking, width)
    elif coat.pattern == "patches":
        # One big patch over an eye/ear and one smaller elsewhere: a calico head is never plain white.
        side = rng.choice((-1, 1))
        big, small = _calico_colours(rng)[:2]
        draw.polygon(head.ellipse(side * 0.55, -0.5, rng.uniform(0.5, 0.7), rng.uniform(0.45, 0.65)), fill=big)
        draw.polygon(
            head.ellipse(-side * 0.6, rng.uniform(-0.7, 0.1), rng.uniform(0.3, 0.45), rng.uniform(0.3, 0.45)),
            fill=small,
        )


def _body_markings(draw: ImageDraw.ImageDraw, body: Body, coat: Coat, rng: np.random.Generator) -> None:
    """Stripes / patches on the body + tail layer; horizontal bands become rings on the upright tail."""
    if coat.pattern == "stripes":
        width = max(2, int(body.rx * 0.13))
        step = body.ry * rng.uniform(0.28, 0.34)
        top, bottom = body.cy - 2.2 * body.ry, body.cy + body.ry
        x0, x1 = body.cx - 3 * body.rx, body.cx + 3 * body.rx
        bend = rng.uniform(0.1, 0.25) * body.ry
        lines = [[(x0, y), (body.cx, y + bend), (x1, y)] for y in np.arange(top, bottom, step)]
        _stripes(draw, lines, coat.marking, width)
    elif coat.pattern == "patches":
        colours = _calico_colours(rng)
        for colour in colours[: int(rng.integers(3, 6))]:
            x = body.cx + rng.uniform(-1.0, 1.0) * body.rx
            y = body.cy + rng.uniform(-0.9, 0.6) * body.ry
            rx, ry = rng.uniform(0.3, 0.6) * body.rx, rng.uniform(0.25, 0.5) * body.ry
            draw.ellipse((x - rx, y - ry, x + rx, y + ry), fill=colour)
        draw.line(body.tail[len(body.tail) // 2 :], fill=colours[-1], width=body.tail_width * 2)


def _point_mask(canvas: int, head: HeadFrame, body: Body) -> Image.Image:
    """Siamese colour points (ears, face mask, paws, tail), blurred so they fade into the cream coat."""
    mask = Image.new("L", (canvas, canvas), 0)
    draw = ImageDraw.Draw(mask)
    for side in (-1, 1):
        draw.polygon(head.ear(side), fill=255)
    draw.polygon(head.ellipse(0.0, 0.25, 0.55, 0.6), fill=255)
    draw.line(body.tail, fill=255, width=body.tail_width + 2, joint="curve")
    for paw in body.paws:
        draw.ellipse(paw, fill=255)
    return mask.filter(ImageFilter.GaussianBlur(head.pose.r * 0.12))


def _draw_coat(
    canvas: int, head: HeadFrame, body: Body, coat: Coat, rng: np.random.Generator
) -> tuple[Image.Image, Image.Image]:
    """The fur (RGB) and the cat's silhouette (L). Body and head are separate layers, so body stripes
    never run across the face."""
    base = _jitter(coat.base, rng, 0.08)
    marking = _jitter(coat.marking, rng, 0.1)
    coat = dataclasses.replace(coat, base=base, marking=marking)

    fur = Image.new("RGB", (canvas, canvas), base)
    _body_markings(ImageDraw.Draw(fur), body, coat, rng)
    silhouette = Image.new("L", (canvas, canvas), 0)
    body_draw = ImageDraw.Draw(silhouette)
    body_draw.ellipse((body.cx - body.rx, body.cy - body.ry, body.cx + body.rx, body.cy + body.ry), fill=255)
    body_draw.line(body.tail, fill=255, width=body.tail_width, joint="curve")
    for paw in body.paws:
        body_draw.ellipse(paw, fill=255)

    head_fur = Image.new("RGB", (canvas, canvas), base)
    _head_markings(ImageDraw.Draw(head_fur), head, coat, rng)
    head_mask = Image.new("L", (canvas, canvas), 0)
    head_draw = ImageDraw.Draw(head_mask)
    head_draw.polygon(head.ellipse(0.0, 0.0, 1.05, 0.95, n=40), fill=255)
    for side in (-1, 1):
        head_draw.polygon(head.ear(side), fill=255)
    fur.paste(head_fur, mask=head_mask)

    if coat.pattern == "points":
        fur.paste(Image.new("RGB", (canvas, canvas), marking), mask=_point_mask(canvas, head, body))
    silhouette.paste(255, mask=head_mask)
    return fur, silhouette


def _draw_face(draw: ImageDraw.ImageDraw, head: HeadFrame, coat: Coat, rng: np.random.Generator) -> None:
    """Inner ears, eyes with slit pupils and a highlight, nose, mouth and whiskers."""
    pose, r = head.pose, head.pose.r
    for side in (-1, 1):
        draw.polygon(head.ear(side, inset=0.45), fill=_jitter(coat.inner_ear, rng, 0.05))
    iris = _jitter(coat.eyes[int(rng.integers(len(coat.eyes)))], rng, 0.1)
    eye_w, eye_y = rng.uniform(0.19, 0.24), rng.uniform(-0.12, 0.0)
    for side in (-1, 1):
        ex = side * rng.uniform(0.36, 0.42)
        draw.polygon(head.ellipse(ex, eye_y, eye_w + 0.03, eye_w * pose.eye_open + 0.03), fill=(20, 18, 20))
        draw.polygon(head.ellipse(ex, eye_y, eye_w, eye_w * pose.eye_open), fill=iris)
        draw.polygon(head.ellipse(ex, eye_y, pose.pupil, eye_w * pose.eye_open * 0.9, n=16), fill=(10, 10, 12))
        draw.polygon(head.ellipse(ex + 0.06, eye_y - 0.06, 0.045, 0.045, n=10), fill=(250, 250, 250))
    draw.polygon([head.pt(-0.13, 0.22), head.pt(0.13, 0.22), head.pt(0.0, 0.36)], fill=coat.nose)
    mouth_width = max(1, int(r * 0.04))
    draw.line([head.pt(0.0, 0.36), head.pt(0.0, 0.45)], fill=(40, 30, 30), width=mouth_width)
    for side in (-1, 1):
        draw.line(
            [head.pt(0.0, 0.45), head.pt(side * 0.12, 0.52), head.pt(side * 0.22, 0.47)],
            fill=(40, 30, 30),
            width=mouth_width,
            joint="curve",
        )
        for droop in (-0.12, 0.0, 0.12):
            draw.line(
                [head.pt(side * 0.3, 0.38), head.pt(side * 1.25, 0.3 + droop * 2 + rng.normal(0, 0.03))],
                fill=coat.whiskers,
                width=max(1, int(r * 0.025)),
            )


def draw_toy_cat(class_name: str, rng: np.random.Generator, size: int) -> Image.Image:
    """One size x size RGB picture of a cat of `class_name`, all randomness drawn from `rng`."""
    coat = COATS[class_name]
    canvas = size * SUPERSAMPLE
    pose = _sample_pose(rng, canvas)
    head, body = HeadFrame(pose), _body_for(pose, rng)
    image = gradient_background(rng, size, canvas)
    fur, silhouette = _draw_coat(canvas, head, body, coat, rng)
    image.paste(fur, mask=silhouette)
    _draw_face(ImageDraw.Draw(image), head, coat, rng)
    return finish(image, size, rng)


TOY_CATS = ToySet("toy cat", TOY_CAT_CLASSES, draw_toy_cat)


# generate_toy_cats(out, per_class, size, seed, classes=None) -> images per class, as toy_sets.generate
generate_toy_cats = partial(generate, TOY_CATS)


@dataclass
class ToyCatsConfig(ToySetConfig):
    out: str = option("data/cats", "output folder (ImageFolder layout: OUT/<class>/*.png)")
    classes: list[str] = option([], f"classes to draw; empty = all of {', '.join(TOY_CAT_CLASSES)}")


def main(cfg: ToyCatsConfig) -> dict[str, int]:
    return generate_and_report(TOY_CATS, cfg)


if __name__ == "__main__":
    run_main(main, ToyCatsConfig, "Draw the built-in toy cats data set (offline, deterministic).")
