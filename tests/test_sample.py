"""scripts/sample.py on a checkpoint from a tiny real training run: grids, folders, class selection, refusals."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from builders import TOY_CLASSES, make_toy_data, save_dit, tiny_config

from scripts import sample, train_dit
from scripts.lib.cli import EXIT_USER_ERROR, parse_config, run_main
from scripts.sample import SampleConfig

IMAGE_SIZE = 16
PADDING = 2  # torchvision's make_grid padding used by save_grid
TRAINED_CFG_SCALE = 2.0


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("sample")
    config = tiny_config(make_toy_data(root / "cats"), root / "runs", steps=2, cfg_scale=TRAINED_CFG_SCALE)
    return train_dit.main(config)["final"]


def argv(checkpoint: Path, out: Path, *args: str) -> list[str]:
    return ["--checkpoint", str(checkpoint), "--out", str(out), "--steps", "2", "--device", "cpu", *args]


def run(checkpoint: Path, out: Path, *args: str) -> list[Path]:
    return sample.main(parse_config(SampleConfig, argv(checkpoint, out, *args), ""))


def test_grid_has_one_row_per_requested_class(checkpoint, tmp_path):
    out = tmp_path / "grid.png"
    run(checkpoint, out, "--class", "white", "0", "--num", "3")
    width, height = Image.open(out).size
    assert (width, height) == (3 * IMAGE_SIZE + 4 * PADDING, 2 * IMAGE_SIZE + 3 * PADDING)


def test_all_classes_by_default_and_the_seed_fixes_the_images(checkpoint, tmp_path):
    paths = [tmp_path / name for name in ("a.png", "b.png", "c.png")]
    for path, seed in zip(paths, ("0", "0", "1"), strict=True):
        run(checkpoint, path, "--num", "2", "--seed", seed)
    first, again, other = (np.asarray(Image.open(path)) for path in paths)
    assert first.shape[0] == len(TOY_CLASSES) * IMAGE_SIZE + (len(TOY_CLASSES) + 1) * PADDING
    assert np.array_equal(first, again)
    assert not np.array_equal(first, other)


def test_guidance_defaults_to_the_training_scale_and_sampling_shows_progress(checkpoint, tmp_path, capsys):
    images = {}
    for name, args in {"default": (), "trained": ("--cfg-scale", "2"), "four": ("--cfg-scale", "4")}.items():
        run(checkpoint, tmp_path / f"{name}.png", "--num", "2", *args)
        images[name] = np.asarray(Image.open(tmp_path / f"{name}.png"))
    assert np.array_equal(images["default"], images["trained"]) and not np.array_equal(
        images["default"], images["four"]
    )
    captured = capsys.readouterr()
    assert "euler 2 steps, cfg 2;" in captured.out.splitlines()[0]
    assert re.search(r"sampling: +\d+%\|.*\| \d/2 \[\d\d:\d\d<", captured.err)  # a bar over the steps, with an ETA
    assert parse_config(SampleConfig, ["--cpu-threads", "2"], "").cpu_threads == 2


@pytest.mark.parametrize(
    ("name", "image_format"), [("grid.jpg", "JPEG"), ("grid.JPEG", "JPEG"), ("grid.webp", "WEBP"), ("g.png", "PNG")]
)
def test_an_image_suffix_is_one_grid_in_that_format(checkpoint, tmp_path, name, image_format):
    assert run(checkpoint, tmp_path / name, "--num", "1") == [tmp_path / name]
    assert Image.open(tmp_path / name).format == image_format


@pytest.mark.parametrize("name", ["images", "grid.gif"])
def test_any_other_out_is_a_folder_of_one_png_per_image(checkpoint, tmp_path, name):
    written = run(checkpoint, tmp_path / name, "--class", "black", "--num", "2", "--sampler", "heun")
    assert [path.name for path in written] == ["0000_black.png", "0001_black.png"]
    assert all(Image.open(path).size == (IMAGE_SIZE, IMAGE_SIZE) for path in written)


def test_file_names_stay_short_whatever_the_class_names(tmp_path):
    names = ["a" * 250, "é" * 200, "ginger"]  # 250 and 400 bytes: beyond a file name's 255 with index and suffix
    path = save_dit(tmp_path / "long.safetensors", class_names=names)
    written = run(path, tmp_path / "out", "--num", "1")
    assert [p.name for p in written] == ["0000_" + "a" * 64 + ".png", "0001_" + "é" * 32 + ".png", "0002_ginger.png"]
    assert all(p.is_file() for p in written)


def existing_folder(tmp_path: Path) -> Path:
    (tmp_path / "taken.png").mkdir()
    return tmp_path / "taken.png"


def existing_file(tmp_path: Path) -> Path:
    (tmp_path / "samples").write_text("not a folder")
    return tmp_path / "samples"


def inside_a_file(tmp_path: Path) -> Path:
    (tmp_path / "notes.txt").write_text("")
    return tmp_path / "notes.txt" / "grid.png"


@pytest.mark.parametrize(
    ("make_out", "args", "message"),
    [
        (None, ("--class", "tiger"), "unknown class 'tiger' — this checkpoint knows black, orange_tabby, white"),
        (None, ("--sampler", "ddim"), "--sampler 'ddim' is not a sampler of the flow objective"),
        (None, ("--num", "0"), "--num must be positive"),
        (None, ("--cfg-scale", "-1"), "--cfg-scale must be >= 0"),
        (None, ("--cfg-scale", "nan"), "--cfg-scale"),
        (None, ("--cfg-scale", "inf"), "--cfg-scale"),
        (None, ("--num", "1000000000"), r"--num 1000000000 x 3 classes needs ~[\d,.]+ GiB of .*memory.* pass --num"),
        (existing_folder, (), "taken.png is a folder, not a grid file"),
        (existing_file, (), "samples is a file, not a folder"),
        (inside_a_file, (), "could not write the samples to .*notes.txt/grid.png .*File exists"),
        (lambda tmp: tmp / "x.png", ("--checkpoint", "/nonexistent.safetensors"), "checkpoint not found"),
    ],
    ids=["class", "sampler", "num", "cfg", "cfg-nan", "cfg-inf", "memory", "out-folder", "out-file", "unwritable",
         "checkpoint"],
)  # fmt: skip
def test_bad_requests_end_in_one_line_and_exit_2(checkpoint, tmp_path, capsys, make_out, args, message):
    out = make_out(tmp_path) if make_out else tmp_path / "x.png"
    with pytest.raises(SystemExit) as exited:
        run_main(sample.main, SampleConfig, "", argv(checkpoint, out, *args))
    assert exited.value.code == EXIT_USER_ERROR
    (line,) = capsys.readouterr().err.strip().splitlines()
    assert re.search(message, line) and line.startswith("error: ")
    assert not (tmp_path / "x.png").exists()
