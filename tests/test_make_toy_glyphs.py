"""The toy glyphs generator: layout, determinism, and classes that need orientation (and only shape) to tell apart."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from scripts.lib.cli import UserError, run_main
from scripts.make_toy_glyphs import MIRROR_OF, TOY_GLYPH_CLASSES, ToyGlyphsConfig, generate_toy_glyphs, main

PER_CLASS = 30


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


def _load(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """(images (N, H, W, 3) float64, class indices in TOY_GLYPH_CLASSES order)."""
    images, labels = [], []
    for index, name in enumerate(TOY_GLYPH_CLASSES):
        for path in sorted((root / name).glob("*.png")):
            with Image.open(path) as image:
                images.append(np.asarray(image, dtype=np.float64))
            labels.append(index)
    return np.stack(images), np.array(labels)


@pytest.fixture(scope="module")
def glyph_sets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("glyphs")
    generate_toy_glyphs(root / "reference", per_class=PER_CLASS, size=32, seed=0)
    generate_toy_glyphs(root / "probe", per_class=PER_CLASS, size=32, seed=1)
    return {"reference": root / "reference", "probe": root / "probe"}


def _shape_features(images: np.ndarray, side: int = 12) -> np.ndarray:
    """Position-, scale- and colour-free shape: the ink (distance from the border's colour), cropped to its
    bounding box and resized to side x side. What is left is the glyph's outline and its orientation."""
    border = np.concatenate([images[:, 0], images[:, -1], images[:, :, 0], images[:, :, -1]], axis=1)
    ink = np.linalg.norm(images - np.median(border, axis=1)[:, None, None], axis=-1)
    features = []
    for picture in ink:
        picture = picture / picture.max()
        rows, cols = np.nonzero(picture > 0.5)
        crop = torch.from_numpy(picture[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1])
        shape = F.interpolate(
            crop[None, None], size=(side, side), mode="bilinear", antialias=True, align_corners=False
        )[0, 0].numpy()
        features.append(shape.ravel() - shape.mean())
    return np.stack(features)


def _nearest_class_mean(reference: Path) -> Callable[[np.ndarray], np.ndarray]:
    images, labels = _load(reference)
    features = _shape_features(images)
    means = np.stack([features[labels == c].mean(axis=0) for c in range(len(TOY_GLYPH_CLASSES))])
    return lambda probe: np.argmin(((_shape_features(probe)[:, None] - means[None]) ** 2).sum(axis=-1), axis=1)


def test_layout_counts_size_and_mode(glyph_sets: dict[str, Path], tmp_path: Path) -> None:
    root = glyph_sets["reference"]
    assert sorted(p.name for p in root.iterdir()) == sorted(TOY_GLYPH_CLASSES)
    for name in TOY_GLYPH_CLASSES:
        files = sorted((root / name).iterdir())
        assert [f.name for f in files] == [f"{name}_{i:05d}.png" for i in range(PER_CLASS)]
        with Image.open(files[0]) as image:
            assert image.size == (32, 32) and image.mode == "RGB"
    generate_toy_glyphs(tmp_path, per_class=1, size=48, seed=0, classes=["q"])
    with Image.open(tmp_path / "q" / "q_00000.png") as image:
        assert image.size == (48, 48)


def test_same_seed_same_bytes_other_seed_differs(glyph_sets: dict[str, Path], tmp_path: Path) -> None:
    generate_toy_glyphs(tmp_path / "again", per_class=PER_CLASS, size=32, seed=0)
    assert _files(tmp_path / "again") == _files(glyph_sets["reference"])
    first = "b/b_00000.png"
    assert (glyph_sets["probe"] / first).read_bytes() != (glyph_sets["reference"] / first).read_bytes()


def test_a_subset_draws_the_same_images(glyph_sets: dict[str, Path], tmp_path: Path) -> None:
    assert generate_toy_glyphs(tmp_path, per_class=2, size=32, seed=0, classes=["p", "Z"]) == {"p": 2, "Z": 2}
    for path in ("p/p_00001.png", "Z/Z_00000.png"):
        assert (tmp_path / path).read_bytes() == (glyph_sets["reference"] / path).read_bytes()


def test_shape_tells_every_class_apart(glyph_sets: dict[str, Path]) -> None:
    predict = _nearest_class_mean(glyph_sets["reference"])
    images, labels = _load(glyph_sets["probe"])
    per_class = [(predict(images[labels == c]) == c).mean() for c in range(len(TOY_GLYPH_CLASSES))]
    assert min(per_class) >= 0.75 and np.mean(per_class) >= 0.88, dict(zip(TOY_GLYPH_CLASSES, per_class, strict=True))


def test_a_mirrored_glyph_is_not_its_own_class(glyph_sets: dict[str, Path]) -> None:
    """Mirrored b/d, p/q and arrows read as their partner class; no mirrored class reads as itself."""
    predict = _nearest_class_mean(glyph_sets["reference"])
    images, labels = _load(glyph_sets["probe"])
    mirrored_as = {name: predict(images[labels == c][:, :, ::-1]) for c, name in enumerate(TOY_GLYPH_CLASSES)}
    own = {name: (found == TOY_GLYPH_CLASSES.index(name)).mean() for name, found in mirrored_as.items()}
    assert np.mean(list(own.values())) <= 0.1 and max(own.values()) <= 0.4, own
    for name, partner in MIRROR_OF.items():
        if partner is not None:
            assert (mirrored_as[name] == TOY_GLYPH_CLASSES.index(partner)).mean() >= 0.75, name


def test_colour_carries_no_class_information(glyph_sets: dict[str, Path]) -> None:
    """A nearest-class-mean on each picture's mean colour guesses the class no better than chance (10%)."""
    reference, reference_labels = _load(glyph_sets["reference"])
    probe, probe_labels = _load(glyph_sets["probe"])
    reference_colours, probe_colours = reference.mean(axis=(1, 2)), probe.mean(axis=(1, 2))
    means = np.stack([reference_colours[reference_labels == c].mean(axis=0) for c in range(len(TOY_GLYPH_CLASSES))])
    guesses = np.argmin(((probe_colours[:, None] - means[None]) ** 2).sum(axis=-1), axis=1)
    assert (guesses == probe_labels).mean() < 0.2


def test_images_within_a_class_vary(glyph_sets: dict[str, Path]) -> None:
    images, labels = _load(glyph_sets["reference"])
    for c, name in enumerate(TOY_GLYPH_CLASSES):
        members = images[labels == c][:10]
        pairwise = np.abs(members[:, None] - members[None]).mean(axis=(2, 3, 4))
        assert pairwise[~np.eye(len(members), dtype=bool)].min() > 5.0, name


def test_unknown_class_and_foreign_folders_are_user_errors(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="unknown toy glyph class"):
        generate_toy_glyphs(tmp_path, per_class=1, size=16, seed=0, classes=["x"])
    (tmp_path / "siamese").mkdir()
    with pytest.raises(UserError, match="already holds other classes"):
        generate_toy_glyphs(tmp_path, per_class=1, size=16, seed=0)


def test_command_line_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, ToyGlyphsConfig, "glyphs", argv=["--out", str(tmp_path), "--per-class", "2", "--classes", "d"])
    assert exit_info.value.code == 0 and "toy glyphs: 2 images (1 classes x 2, 64px, seed 0)" in capsys.readouterr().out
    assert sorted(_files(tmp_path)) == ["d/d_00000.png", "d/d_00001.png"]
