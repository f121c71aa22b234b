"""The toy cats generator: layout, determinism, per-image variation and class separability."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from scripts.lib.cli import UserError, run_main
from scripts.make_toy_cats import TOY_CAT_CLASSES, ToyCatsConfig, generate_toy_cats, main


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.png"))}


@pytest.fixture(scope="module")
def toy_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("toy") / "cats"
    generate_toy_cats(out, per_class=12, size=32, seed=0)
    return out


def _pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path), dtype=np.float64)


def test_layout_counts_size_and_mode(toy_set: Path) -> None:
    assert len(TOY_CAT_CLASSES) >= 6
    assert sorted(p.name for p in toy_set.iterdir()) == sorted(TOY_CAT_CLASSES)
    for name in TOY_CAT_CLASSES:
        files = sorted((toy_set / name).iterdir())
        assert [f.name for f in files] == [f"{name}_{i:05d}.png" for i in range(12)]
        with Image.open(files[0]) as image:
            assert image.size == (32, 32) and image.mode == "RGB"


def test_same_seed_same_bytes_other_seed_differs(toy_set: Path, tmp_path: Path) -> None:
    generate_toy_cats(tmp_path / "again", per_class=12, size=32, seed=0)
    assert _files(tmp_path / "again") == _files(toy_set)
    generate_toy_cats(tmp_path / "other", per_class=2, size=32, seed=1)
    assert (tmp_path / "other/black/black_00000.png").read_bytes() != (toy_set / "black/black_00000.png").read_bytes()


# sha256 of the decoded pixels of images 0-2 of every class (32 px, seed 0), in TOY_CAT_CLASSES order, as drawn
# before the toy-set scaffolding moved to scripts/lib/toy_sets.py. Refactors must not redraw the data set
# (every README figure was measured on it); only a deliberate change of the drawing may update this digest.
PIXELS_SHA256_SEED0 = "56aa66e5321584ef14fafb82fac4c9120e9706a7ddd88789efb737c12a349cb0"


def test_pixels_are_those_every_measurement_was_made_on(toy_set: Path) -> None:
    digest = hashlib.sha256()
    for name in TOY_CAT_CLASSES:
        for index in range(3):
            with Image.open(toy_set / name / f"{name}_{index:05d}.png") as image:
                digest.update(np.asarray(image).tobytes())
    assert digest.hexdigest() == PIXELS_SHA256_SEED0


def test_subset_and_count_leave_other_images_unchanged(toy_set: Path, tmp_path: Path) -> None:
    counts = generate_toy_cats(tmp_path, per_class=3, size=32, seed=0, classes=["siamese", "calico"])
    assert counts == {"siamese": 3, "calico": 3}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calico", "siamese"]
    for name in ("calico", "siamese"):
        for i in range(3):
            path = f"{name}/{name}_{i:05d}.png"
            assert (tmp_path / path).read_bytes() == (toy_set / path).read_bytes()


def test_rerun_with_fewer_images_removes_stale_ones(tmp_path: Path) -> None:
    generate_toy_cats(tmp_path, per_class=4, size=16, seed=0, classes=["white"])
    (tmp_path / "white" / "my_notes.png").write_bytes(b"not ours")
    generate_toy_cats(tmp_path, per_class=2, size=16, seed=0, classes=["white"])
    assert sorted(p.name for p in (tmp_path / "white").iterdir()) == [
        "my_notes.png",
        "white_00000.png",
        "white_00001.png",
    ]


def test_images_within_a_class_vary(toy_set: Path) -> None:
    for name in TOY_CAT_CLASSES:
        images = np.stack([_pixels(p) for p in sorted((toy_set / name).iterdir())])
        pairwise = np.abs(images[:, None] - images[None]).mean(axis=(2, 3, 4))
        off_diagonal = pairwise[~np.eye(len(images), dtype=bool)]
        assert off_diagonal.min() > 5.0, name  # no two pictures are near-copies


def _cat_colour_stats(images: np.ndarray) -> np.ndarray:
    """Mean and spread of the centre of the pictures, where the cat mostly is."""
    centre = images[:, 10:26, 8:24].reshape(len(images), -1, 3)
    return np.concatenate([centre.mean(axis=(0, 1)), centre.std(axis=1).mean(axis=0)])


def test_classes_differ_in_colour_statistics(toy_set: Path) -> None:
    stats = {
        name: _cat_colour_stats(np.stack([_pixels(p) for p in sorted((toy_set / name).iterdir())]))
        for name in TOY_CAT_CLASSES
    }
    names = list(stats)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            assert np.abs(stats[a] - stats[b]).max() > 12.0, (a, b)
    brightness = {name: s[:3].mean() for name, s in stats.items()}
    assert brightness["black"] < brightness["grey_tabby"] < brightness["white"]
    red_minus_blue = {name: s[0] - s[2] for name, s in stats.items()}
    assert red_minus_blue["orange_tabby"] > red_minus_blue["grey_tabby"] + 40


@pytest.mark.parametrize(
    "arguments, message",
    [
        ({"classes": ["tiger"]}, "unknown toy cat class"),
        ({"per_class": 0}, "--per-class must be >= 1"),
        ({"size": 7}, "--size >= 8"),
        ({"foreign_class": "Abyssinian"}, "already holds other classes"),
    ],
)
def test_user_errors_draw_nothing(tmp_path: Path, arguments: dict, message: str) -> None:
    arguments = {"per_class": 1, "size": 16, "seed": 0} | arguments
    if foreign_class := arguments.pop("foreign_class", None):
        (tmp_path / foreign_class).mkdir()
    with pytest.raises(UserError, match=message):
        generate_toy_cats(tmp_path, **arguments)
    assert not list(tmp_path.rglob("*.png"))


def test_command_line_prints_a_summary(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["--out", str(tmp_path), "--per-class", "2", "--size", "16", "--seed", "3", "--classes", "black", "white"]
    with pytest.raises(SystemExit) as exit_info:
        run_main(main, ToyCatsConfig, "toy cats", argv=argv)
    assert exit_info.value.code == 0 and "toy cats: 4 images (2 classes x 2, 16px, seed 3)" in capsys.readouterr().out
    assert _files(tmp_path).keys() == {f"{c}/{c}_0000{i}.png" for c in ("black", "white") for i in (0, 1)}
