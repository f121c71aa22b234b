"""scripts/sample.py on a checkpoint from a tiny real training run: grids, folders, class selection."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from builders import TOY_CLASSES, make_toy_data, tiny_config

from scripts import sample, train_dit
from scripts.lib.cli import UserError, parse_config
from scripts.sample import SampleConfig

IMAGE_SIZE = 16
PADDING = 2  # torchvision's make_grid padding used by save_grid


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    return train_dit.main(tiny_config(make_toy_data(root / "cats"), root / "runs", steps=2))["final"]


def sample_config(checkpoint: Path, out: Path, *args: str) -> SampleConfig:
    return parse_config(
        SampleConfig, ["--checkpoint", str(checkpoint), "--out", str(out), "--steps", "2", "--device", "cpu", *args], ""
    )


def test_grid_has_one_row_per_requested_class(checkpoint, tmp_path):
    out = tmp_path / "grid.png"
    sample.main(sample_config(checkpoint, out, "--class", "white", "0", "--num", "3"))
    width, height = Image.open(out).size
    assert (width, height) == (3 * IMAGE_SIZE + 4 * PADDING, 2 * IMAGE_SIZE + 3 * PADDING)


def test_all_classes_by_default_and_the_seed_fixes_the_images(checkpoint, tmp_path):
    paths = [tmp_path / name for name in ("a.png", "b.png", "c.png")]
    for path, seed in zip(paths, ("0", "0", "1"), strict=True):
        sample.main(sample_config(checkpoint, path, "--num", "2", "--seed", seed))
    first, again, other = (np.asarray(Image.open(path)) for path in paths)
    assert first.shape[0] == len(TOY_CLASSES) * IMAGE_SIZE + (len(TOY_CLASSES) + 1) * PADDING
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_folder_output_writes_one_png_per_image(checkpoint, tmp_path):
    written = sample.main(
        sample_config(checkpoint, tmp_path / "images", "--class", "black", "--num", "2", "--sampler", "heun")
    )
    assert [path.name for path in written] == ["0000_black.png", "0001_black.png"]
    assert all(Image.open(path).size == (IMAGE_SIZE, IMAGE_SIZE) for path in written)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--class", "tiger"), "unknown class 'tiger' — this checkpoint knows black, orange_tabby, white"),
        (("--sampler", "ddim"), "unknown --sampler 'ddim' for the flow objective"),
        (("--num", "0"), "--num must be positive"),
    ],
)
def test_bad_requests_say_what_to_do(checkpoint, tmp_path, args, message):
    with pytest.raises(UserError, match=message):
        sample.main(sample_config(checkpoint, tmp_path / "x.png", *args))


def test_missing_checkpoint_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        sample.main(sample_config(tmp_path / "nope.safetensors", tmp_path / "x.png"))
