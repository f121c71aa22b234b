"""Tests of the shared data pipeline: folder checks, decoding, the uint8 cache, batch order, augmentation."""

from __future__ import annotations

import dataclasses
import io
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from scripts.lib import data
from scripts.lib.cli import UserError

RED, BLUE, GREEN = (220, 20, 20), (20, 20, 220), (20, 200, 20)


# -------------------------------------------------------------------------------- helpers


def save_image(
    path: Path,
    size: tuple[int, int] = (12, 10),
    color: tuple[int, ...] | int = RED,
    mode: str = "RGB",
    fmt: str | None = None,
) -> Path:
    """A one-colour image file at `path` (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def make_image_folder(root: Path, counts: dict[str, int], size: tuple[int, int] = (12, 10)) -> Path:
    """root/<class>/<i>.png with a distinct colour per image, so cache rows can be matched to files."""
    for class_index, (name, count) in enumerate(counts.items()):
        for i in range(count):
            save_image(root / name / f"{i:03d}.png", size, color=(40 * class_index, 7 * i % 256, 90))
    return root


def write_bytes(path: Path, payload: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(payload)
    return path


def jpeg_bytes(size: tuple[int, int] = (32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, RED).save(buffer, format="JPEG")
    return buffer.getvalue()


def png_bytes(size: tuple[int, int] = (64, 64)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (*size, 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


def assert_all_close_to(array: np.ndarray, color: tuple[int, int, int], tolerance: int = 12) -> None:
    difference = np.abs(array.reshape(-1, 3).astype(int) - np.array(color))
    assert difference.max() <= tolerance, f"max difference {difference.max()} from {color}"


# -------------------------------------------------------------------------------- scanning


def test_scan_lists_sorted_classes_and_images_and_skips_clutter(tmp_path):
    names = ("tabby/b.JPG", "tabby/a.png", "black/x.jpeg", ".ipynb_checkpoints/c.jpg", "__pycache__/d.jpg")
    for name in names:
        save_image(tmp_path / name)
    (tmp_path / "tabby" / "notes.txt").write_text("not an image")
    (tmp_path / "README.md").write_text("loose file")

    listing = data.scan_image_folder(tmp_path)

    assert listing.class_names == ["black", "tabby"]
    assert [(p.relative_to(tmp_path).as_posix(), label) for p, label in listing.files] == [
        ("black/x.jpeg", 0),
        ("tabby/a.png", 1),
        ("tabby/b.JPG", 1),
    ]


@pytest.mark.parametrize(
    "case, expected",
    [
        ("missing", "does not exist"),
        ("file", "is a file"),
        ("no_classes", "no class subfolders"),
        ("empty_class", "class folder"),
        ("only_non_images", "has no image files"),
    ],
)
def test_scan_rejects_bad_layouts_with_actionable_message(tmp_path, case, expected):
    root = tmp_path / "cats"
    if case == "file":
        write_bytes(root, b"x")
    elif case == "no_classes":
        save_image(root / ".ipynb_checkpoints" / "a.jpg")
        save_image(root / "loose.jpg")
    elif case == "empty_class":
        save_image(root / "tabby" / "a.jpg")
        (root / "ginger").mkdir()
    elif case == "only_non_images":
        (root / "tabby").mkdir(parents=True)
        (root / "tabby" / "a.svg").write_text("<svg/>")

    with pytest.raises(UserError, match=expected) as error:
        data.scan_image_folder(root)

    message = str(error.value)
    assert str(root) in message
    if case in ("missing", "no_classes"):
        assert "make_toy_cats.py --out" in message
    if case == "empty_class":
        assert "ginger" in message


# -------------------------------------------------------------------------------- decoding


@pytest.mark.parametrize(
    "name, payload, reason",
    [
        ("empty.jpg", b"", "empty"),
        ("truncated.jpg", jpeg_bytes()[:200], "truncated"),
        ("truncated.png", png_bytes()[:300], "truncated"),
        ("text.jpg", b"just some text, renamed to look like a photo\n" * 5, "not an image"),
        ("document.jpg", b"%PDF-1.4\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n", "not an image"),
    ],
)
def test_load_rgb_raises_unreadable_image_for_broken_files(tmp_path, name, payload, reason):
    path = write_bytes(tmp_path / name, payload)
    with pytest.raises(data.UnreadableImage, match=reason) as error:
        data.load_rgb(path, 8)
    assert error.value.path == path
    assert error.value.reason


def test_load_rgb_turns_decompression_bomb_into_unreadable_image(tmp_path, monkeypatch):
    path = save_image(tmp_path / "huge.png", size=(64, 64))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 100)
    with pytest.raises(data.UnreadableImage, match="DecompressionBomb"):
        data.load_rgb(path, 8)


def test_load_rgb_resizes_shorter_side_and_crops_the_centre(tmp_path):
    tall = Image.new("RGB", (30, 90), GREEN)
    tall.paste(Image.new("RGB", (30, 30), RED), (0, 30))
    tall.save(tmp_path / "tall.png")

    out = data.load_rgb(tmp_path / "tall.png", 10)

    assert out.shape == (10, 10, 3) and out.dtype == np.uint8
    assert_all_close_to(out[2:-2], RED, tolerance=2)  # the edge rows blend in a little green, as resize would


@pytest.mark.parametrize(
    "mode, color, fmt, expected",
    [
        ("L", 100, "PNG", (100, 100, 100)),
        ("1", 1, "PNG", (255, 255, 255)),
        ("RGBA", (0, 0, 0, 0), "PNG", (255, 255, 255)),  # fully transparent black -> white, not black
        ("LA", (0, 0), "PNG", (255, 255, 255)),
        ("CMYK", (0, 255, 255, 0), "JPEG", (255, 0, 0)),
        ("CMYK", (0, 255, 255, 0), "TIFF", (255, 0, 0)),
        ("F", 60.0, "TIFF", (60, 60, 60)),
    ],
)
def test_load_rgb_converts_colour_modes_to_rgb(tmp_path, mode, color, fmt, expected):
    path = save_image(tmp_path / f"image.{fmt.lower()}", size=(8, 8), color=color, mode=mode, fmt=fmt)
    assert_all_close_to(data.load_rgb(path, 4), expected, tolerance=3)


def test_load_rgb_composites_transparent_palette_pixels_on_white(tmp_path):
    image = Image.new("P", (8, 8), 0)
    image.putpalette([0, 0, 0, 200, 30, 30] + [0] * 762)
    image.paste(1, (0, 0, 8, 4))  # top half opaque red, bottom half transparent black
    image.save(tmp_path / "palette.png", transparency=0)

    out = data.load_rgb(tmp_path / "palette.png", 8)

    assert_all_close_to(out[:3], (200, 30, 30), tolerance=3)
    assert_all_close_to(out[5:], (255, 255, 255), tolerance=3)


def test_load_rgb_scales_16_bit_grayscale_instead_of_clipping_to_white(tmp_path):
    Image.fromarray(np.full((8, 8), 0x8000, dtype=np.uint16)).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")

    assert_all_close_to(data.load_rgb(tmp_path / "deep.png", 4), (128, 128, 128), tolerance=1)


def test_load_rgb_applies_exif_orientation(tmp_path):
    wide = Image.new("RGB", (40, 20), BLUE)
    wide.paste(Image.new("RGB", (20, 20), RED), (0, 0))  # left half red, right half blue as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display": the stored left edge becomes the top
    wide.save(tmp_path / "rotated.jpg", exif=exif, quality=95)

    out = data.load_rgb(tmp_path / "rotated.jpg", 10)

    assert_all_close_to(out[:4], RED, tolerance=40)
    assert_all_close_to(out[6:], BLUE, tolerance=40)


# -------------------------------------------------------------------------------- the cache


def test_cache_holds_decoded_images_labels_and_class_names(tmp_path):
    root = make_image_folder(tmp_path / "cats", {"black": 2, "tabby": 3})

    cache = data.load_or_build_cache(root, 6, show_progress=False)

    assert len(cache) == 5 and len(cache.class_names) == 2
    assert cache.images.shape == (5, 3, 6, 6) and cache.images.dtype == np.uint8
    assert isinstance(cache.images, np.memmap)
    assert cache.labels.tolist() == [0, 0, 1, 1, 1] and cache.labels.dtype == np.int64
    assert cache.class_names == ["black", "tabby"] and cache.skipped == []
    assert cache.path.parent == root / data.CACHE_DIR_NAME
    expected = data.load_rgb(root / "tabby" / "002.png", 6).transpose(2, 0, 1)
    np.testing.assert_array_equal(cache.images[4], expected)


def test_cache_is_reused_without_decoding(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "cats", {"black": 2, "tabby": 2})
    first = data.load_or_build_cache(root, 6, show_progress=False)

    def no_decoding(path, size):
        raise AssertionError(f"decoded {path} although the cache is valid")

    monkeypatch.setattr(data, "load_rgb", no_decoding)
    second = data.load_or_build_cache(root, 6, show_progress=False)

    assert second.path == first.path
    np.testing.assert_array_equal(second.images, first.images)


def test_cache_is_rebuilt_when_files_or_size_change(tmp_path):
    root = make_image_folder(tmp_path / "cats", {"black": 2, "tabby": 2})
    original = data.load_or_build_cache(root, 6, show_progress=False)

    save_image(root / "tabby" / "new.png", color=GREEN)
    added = data.load_or_build_cache(root, 6, show_progress=False)
    assert len(added) == 5
    assert not original.path.exists(), "the stale cache of the same size is removed"

    save_image(root / "black" / "000.png", size=(14, 10), color=BLUE)
    modified = data.load_or_build_cache(root, 6, show_progress=False)
    assert_all_close_to(modified.images[0].transpose(1, 2, 0), BLUE, tolerance=1)

    resized = data.load_or_build_cache(root, 4, show_progress=False)
    assert resized.images.shape == (5, 3, 4, 4)
    assert modified.path.exists(), "caches of other sizes are kept"


@pytest.mark.parametrize("damage", ["images", "metadata"])
def test_damaged_cache_is_rebuilt(tmp_path, damage):
    root = make_image_folder(tmp_path / "cats", {"black": 2, "tabby": 2})
    cache = data.load_or_build_cache(root, 6, show_progress=False)
    if damage == "images":
        np.save(cache.path, np.zeros((1, 3, 6, 6), dtype=np.uint8))  # e.g. overwritten by hand
    else:
        cache.path.with_suffix(".json").write_text(json.dumps({"labels": [0, 0, 1, 1]}))

    rebuilt = data.load_or_build_cache(root, 6, show_progress=False)

    assert rebuilt.images.shape == (4, 3, 6, 6) and rebuilt.class_names == ["black", "tabby"]


def test_interrupted_build_leaves_nothing_that_is_trusted_later(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "cats", {"black": 2, "tabby": 2})
    real_load_rgb = data.load_rgb
    calls = []

    def dies_on_third_image(path, size):
        calls.append(path)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_load_rgb(path, size)

    monkeypatch.setattr(data, "load_rgb", dies_on_third_image)
    with pytest.raises(KeyboardInterrupt):
        data.load_or_build_cache(root, 6, show_progress=False)
    assert list((root / data.CACHE_DIR_NAME).iterdir()) == []

    monkeypatch.setattr(data, "load_rgb", real_load_rgb)
    assert len(data.load_or_build_cache(root, 6, show_progress=False)) == 4


def test_unreadable_files_are_skipped_with_one_counted_warning(tmp_path):
    root = make_image_folder(tmp_path / "cats", {"black": 2, "tabby": 2})
    write_bytes(root / "black" / "001b.jpg", b"")
    write_bytes(root / "tabby" / "zz.jpg", b"plain text")
    warnings: list[str] = []

    cache = data.load_or_build_cache(root, 6, warn=warnings.append, show_progress=False)

    assert len(warnings) == 1
    assert "skipped 2" in warnings[0] and "black/001b.jpg" in warnings[0] and "tabby/zz.jpg" in warnings[0]
    assert len(cache) == 4 and cache.labels.tolist() == [0, 0, 1, 1]
    assert len(cache.skipped) == 2
    expected = data.load_rgb(root / "tabby" / "000.png", 6).transpose(2, 0, 1)
    np.testing.assert_array_equal(cache.images[2], expected)
    meta = json.loads(cache.path.with_suffix(".json").read_text())
    assert meta["skipped"] == cache.skipped


def test_nothing_readable_is_a_user_error(tmp_path):
    write_bytes(tmp_path / "cats" / "tabby" / "a.jpg", b"")
    write_bytes(tmp_path / "cats" / "black" / "b.png", b"text")
    with pytest.raises(UserError, match="none of the 2 image files"):
        data.load_or_build_cache(tmp_path / "cats", 6, warn=lambda message: None, show_progress=False)


def test_cache_falls_back_to_user_cache_when_data_folder_cannot_hold_it(tmp_path, monkeypatch):
    root = make_image_folder(tmp_path / "cats", {"black": 1, "tabby": 1})
    (root / data.CACHE_DIR_NAME).write_text("a file where the cache folder would go")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))

    cache = data.load_or_build_cache(root, 6, show_progress=False)

    assert cache.path.is_relative_to(tmp_path / "user-cache" / "tiny-cats")
    assert data.load_or_build_cache(root, 6, show_progress=False).path == cache.path


@pytest.mark.parametrize(
    "files, cores, available, expected",
    [
        (10, 16, 10**12, 1),  # a small build decodes in the calling thread
        (1000, 16, 10**12, data.MAX_DECODE_WORKERS),
        (1000, 2, 10**12, 2),  # no more threads than cores
        (1000, 16, 6 * data.WORST_DECODE_BYTES, 3),  # half the available memory at the worst case per decode
        (1000, 16, data.WORST_DECODE_BYTES, 1),  # always at least one
        (1000, 16, None, 2),  # memory unknown
    ],
)
def test_decoder_threads_are_bounded_by_cores_and_memory(monkeypatch, files, cores, available, expected):
    monkeypatch.setattr(data.os, "cpu_count", lambda: cores)
    assert data.decode_workers(files, available) == expected


def test_parallel_build_matches_single_image_decoding(tmp_path):
    root = make_image_folder(tmp_path / "cats", {"black": 40, "tabby": 40}, size=(9, 7))

    cache = data.load_or_build_cache(root, 5, cache_dir=tmp_path / "elsewhere", show_progress=False)

    assert cache.path.parent == tmp_path / "elsewhere"
    listing = data.scan_image_folder(root)
    expected = np.stack([data.load_rgb(path, 5).transpose(2, 0, 1) for path, _ in listing.files])
    np.testing.assert_array_equal(cache.images, expected)
    assert cache.labels.tolist() == [label for _, label in listing.files]


# -------------------------------------------------------------------------------- splits


def test_stratified_split_covers_every_class_and_is_deterministic():
    labels = np.array([0] * 10 + [1] * 2 + [2] * 1 + [3] * 5)

    train, val = data.stratified_split(labels, 0.2, seed=3)

    assert sorted(np.concatenate([train, val]).tolist()) == list(range(len(labels)))
    assert set(labels[val]) == {0, 1, 3}, "every class with >= 2 images is validated"
    assert set(labels[train]) == {0, 1, 2, 3}
    assert (labels[val] == 0).sum() == 2
    again = data.stratified_split(labels, 0.2, seed=3)
    np.testing.assert_array_equal(train, again[0])
    assert not np.array_equal(val, data.stratified_split(labels, 0.2, seed=4)[1])


def test_stratified_split_without_validation_and_bad_fraction():
    labels = np.array([0, 0, 1, 1])
    train, val = data.stratified_split(labels, 0.0, seed=0)
    assert train.tolist() == [0, 1, 2, 3] and val.size == 0
    with pytest.raises(UserError, match="validation fraction"):
        data.stratified_split(labels, 1.0, seed=0)


# -------------------------------------------------------------------------------- batch order


def test_batches_are_a_pure_function_of_seed_and_step():
    first = data.global_batch_indices(50, 8, step=3, seed=1)
    np.testing.assert_array_equal(first, data.global_batch_indices(50, 8, step=3, seed=1))
    assert not np.array_equal(first, data.global_batch_indices(50, 8, step=4, seed=1))
    assert not np.array_equal(first, data.global_batch_indices(50, 8, step=3, seed=2))


@pytest.mark.parametrize("num_items, batch", [(10, 4), (10, 25), (12, 3)])
def test_every_item_appears_once_per_epoch(num_items, batch):
    epochs = 3
    steps = epochs * num_items // batch + 1
    stream = np.concatenate([data.global_batch_indices(num_items, batch, s, seed=7) for s in range(steps)])

    for epoch in range(epochs):
        chunk = stream[epoch * num_items : (epoch + 1) * num_items]
        np.testing.assert_array_equal(chunk, np.random.default_rng([7, epoch]).permutation(num_items))


def test_pool_maps_stream_positions_to_dataset_indices():
    pool = np.array([3, 8, 11, 20])
    batch = data.global_batch_indices(4, 4, step=0, seed=0, pool=pool)
    assert sorted(batch.tolist()) == [3, 8, 11, 20]


def test_shards_are_disjoint_and_make_up_the_global_batch():
    batch = data.global_batch_indices(100, 16, step=5, seed=0)
    shards = [batch[slice(*data.shard_bounds(len(batch), rank, 2))] for rank in range(2)]

    assert len(shards[0]) == len(shards[1]) == 8
    assert not set(shards[0]) & set(shards[1])
    np.testing.assert_array_equal(np.concatenate(shards), batch)
    with pytest.raises(UserError, match="multiple of 3"):
        data.shard_bounds(len(batch), 0, 3)


# -------------------------------------------------------------------------------- augmentation


def random_uint8_batch(batch: int = 6, size: int = 8, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, size, size), dtype=torch.uint8, generator=generator)


@pytest.mark.parametrize("level", data.AUGMENTATION_LEVELS)
def test_every_level_gives_float_images_in_unit_range(level):
    images = random_uint8_batch()
    params = data.draw_augmentation(level, 6, 8, data.step_generator(0, 0))

    out = data.apply_augmentation(images, params)

    assert out.shape == images.shape and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert params.crops == (level in ("medium", "full")) and params.colour == (level == "full")


def test_identity_parameters_change_nothing():
    images = random_uint8_batch()
    out = data.apply_augmentation(images, data.identity_augmentation(6))
    torch.testing.assert_close(out, data.to_unit_float(images), rtol=0, atol=0)


def test_flip_mirrors_exactly_the_flagged_images():
    images = random_uint8_batch()
    params = data.identity_augmentation(6)
    params.flip = torch.tensor([True, False, True, False, False, True])

    out = data.apply_augmentation(images, params)

    expected = data.to_unit_float(images)
    expected[params.flip] = expected[params.flip].flip(-1)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


def test_crop_stage_with_full_crop_is_identity_and_flips_exactly():
    images = random_uint8_batch()
    params = dataclasses.replace(data.identity_augmentation(6), crops=True)
    params.flip = torch.tensor([True, False, True, False, False, True])

    out = data.apply_augmentation(images, params)

    expected = data.to_unit_float(images)
    expected[params.flip] = expected[params.flip].flip(-1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_colour_jitter_matches_torchvision_per_sample():
    from torchvision.transforms.v2 import functional  # the reference; imported here as it is slow to load

    images = torch.randint(70, 180, (4, 3, 8, 8), dtype=torch.uint8)  # mid-range: no clipping in between
    params = data.draw_augmentation("full", 4, 8, data.step_generator(3, 1))
    params.crops = False
    params.flip[:] = False

    out = data.apply_augmentation(images, params)

    for i, image in enumerate(data.to_unit_float(images)):
        image = functional.adjust_brightness(image, params.brightness[i].item())
        image = functional.adjust_contrast(image, params.contrast[i].item())
        image = functional.adjust_saturation(image, params.saturation[i].item())
        torch.testing.assert_close(out[i], image, rtol=0, atol=2e-3)


def test_level_none_leaves_images_as_they_are():
    images = random_uint8_batch(batch=32)
    params = data.draw_augmentation("none", 32, 8, data.step_generator(1, 2))
    assert not params.flip.any()
    torch.testing.assert_close(data.apply_augmentation(images, params), data.to_unit_float(images), rtol=0, atol=0)


def test_basic_level_only_flips():
    images = random_uint8_batch(batch=32)
    params = data.draw_augmentation("basic", 32, 8, data.step_generator(1, 2))

    out = data.apply_augmentation(images, params)

    assert 0 < params.flip.sum() < 32
    assert torch.all(params.crop_side == 1) and torch.all(params.crop_shift == 0)
    expected = torch.where(params.flip.view(-1, 1, 1, 1), images.flip(-1), images)
    torch.testing.assert_close(out, data.to_unit_float(expected), rtol=0, atol=0)


def test_medium_level_crops_inside_the_image():
    params = data.draw_augmentation("medium", 200, 16, data.step_generator(0, 0))
    assert torch.all(params.crop_side >= data.MIN_CROP_SIDE) and torch.all(params.crop_side <= 1)
    assert torch.all(params.crop_shift.abs() <= (1 - params.crop_side)[:, None] + 1e-6)
    assert params.crop_side.std() > 0.02

    images = random_uint8_batch(batch=200, size=16)
    flipped_only = data.apply_augmentation(images, dataclasses.replace(params, crops=False))
    assert (data.apply_augmentation(images, params) - flipped_only).abs().mean() > 0.01


def test_full_level_jitters_colour_but_never_the_hue():
    gray = torch.full((16, 3, 8, 8), 100, dtype=torch.uint8)
    gray[:, :, :4] = 180
    params = data.draw_augmentation("full", 16, 8, data.step_generator(0, 5))

    out = data.apply_augmentation(gray, params)

    torch.testing.assert_close(out[:, 0], out[:, 1])
    torch.testing.assert_close(out[:, 1], out[:, 2])
    assert not torch.allclose(out.mean((1, 2, 3)), data.to_unit_float(gray).mean((1, 2, 3)), atol=1e-3)


def test_unknown_level_is_a_user_error():
    with pytest.raises(UserError, match="basic, medium, full"):
        data.draw_augmentation("extreme", 4, 8, data.step_generator(0, 0))


def test_step_generator_is_deterministic_per_seed_and_step():
    draw = lambda seed, step: data.draw_augmentation("full", 8, 8, data.step_generator(seed, step))  # noqa: E731
    torch.testing.assert_close(draw(1, 2).crop_side, draw(1, 2).crop_side, rtol=0, atol=0)
    assert not torch.equal(draw(1, 2).crop_side, draw(1, 3).crop_side)


def test_two_ranks_see_exactly_the_samples_of_one_process():
    cache = data.synthetic_cache(40, 8, num_classes=3)
    pool = np.arange(5, 35)

    source = data.ImageSource(cache, "cpu")
    whole, whole_labels = data.training_batch(source, 8, step=4, seed=9, level="full", pool=pool)
    parts = [
        data.training_batch(source, 8, step=4, seed=9, level="full", rank=rank, world_size=2, pool=pool)
        for rank in range(2)
    ]

    torch.testing.assert_close(torch.cat([p[0] for p in parts]), whole, rtol=0, atol=0)
    torch.testing.assert_close(torch.cat([p[1] for p in parts]), whole_labels, rtol=0, atol=0)
    indices = data.global_batch_indices(30, 8, 4, 9, pool=pool)
    torch.testing.assert_close(whole_labels, torch.from_numpy(cache.labels[indices]))


@pytest.mark.parametrize("level", data.AUGMENTATION_LEVELS)
def test_device_resident_images_give_bitwise_the_batches_of_the_host_path(level):
    cache = data.synthetic_cache(50, 8, num_classes=4)
    on_host = data.ImageSource(cache, "cpu", placement="host")
    on_device = data.ImageSource(cache, "cpu", placement="device")
    assert isinstance(on_device.images, torch.Tensor) and not isinstance(on_host.images, torch.Tensor)
    for step in (0, 3, 7):  # 7 crosses into the second epoch
        host_images, host_labels = data.training_batch(on_host, 8, step, seed=2, level=level)
        device_images, device_labels = data.training_batch(on_device, 8, step, seed=2, level=level)
        torch.testing.assert_close(device_images, host_images, rtol=0, atol=0)
        torch.testing.assert_close(device_labels, host_labels, rtol=0, atol=0)


def test_a_prefetched_batch_is_used_only_for_the_indices_it_was_gathered_for():
    cache = data.synthetic_cache(50, 8, num_classes=4)
    source = data.ImageSource(cache, "cpu", placement="host", background=True)
    first, second = np.array([4, 4, 0, 49]), np.array([1, 2, 3, 5])
    source.prefetch(first)
    torch.testing.assert_close(source.gather(first)[0], torch.from_numpy(cache.images[first]), rtol=0, atol=0)
    source.prefetch(first)  # the next step wanted other rows after all: the prefetched batch must not be used
    images, labels = source.gather(second)
    torch.testing.assert_close(images, torch.from_numpy(cache.images[second]), rtol=0, atol=0)
    torch.testing.assert_close(labels, torch.from_numpy(cache.labels[second]), rtol=0, atol=0)


def test_gather_batch_keeps_the_requested_order():
    images = np.arange(10, dtype=np.uint8).reshape(10, 1, 1, 1) * np.ones((1, 3, 2, 2), dtype=np.uint8)
    batch = data.gather_batch(images, np.array([7, 2, 9, 2]))
    assert batch[:, 0, 0, 0].tolist() == [7, 2, 9, 2]


def test_two_unicode_spellings_of_one_class_name_are_refused_by_the_scan(tmp_path):
    for name in ("caf\u00e9", "cafe\u0301"):  # NFC and NFD: they print identically
        (tmp_path / name).mkdir()
        Image.new("RGB", (8, 8)).save(tmp_path / name / "a.png")
    with pytest.raises(UserError, match="one name in two Unicode spellings"):
        data.scan_image_folder(tmp_path)
