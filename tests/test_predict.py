"""scripts/predict.py: top-k output from a checkpoint; bad inputs reported per file, with a failing exit."""

from __future__ import annotations

import re
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from models.classifier import build_classifier
from scripts import predict
from scripts.lib.checkpoints import classifier_metadata, save_model
from scripts.lib.cli import EXIT_USER_ERROR, UserError, parse_config, run_main
from scripts.predict import PredictConfig, main

CLASSES = ["black", "orange", "white"]


@pytest.fixture
def checkpoint(tmp_path) -> Path:
    """An untrained (but valid) 3-class mobilenet checkpoint at 32 px: predict only needs the file format."""
    torch.manual_seed(0)
    model = build_classifier("mobilenet_v3_small", len(CLASSES)).eval()
    metadata = classifier_metadata(
        {}, backbone="mobilenet_v3_small", image_size=32, class_names=CLASSES, metrics={}, epoch=1
    )
    return save_model(tmp_path / "model.safetensors", model, metadata)


def write_image(path: Path, colour: tuple[int, int, int], size: tuple[int, int] = (48, 40)) -> Path:
    Image.new("RGB", size, colour).save(path)
    return path


def test_prints_top_k_classes_with_probabilities(checkpoint, tmp_path, capsys):
    images = [write_image(tmp_path / "a.png", (20, 20, 20)), write_image(tmp_path / "b.jpg", (240, 120, 40))]
    results = main(PredictConfig(images=[str(p) for p in images], checkpoint=str(checkpoint), top_k=2, device="cpu"))
    assert [r.path for r in results] == images
    for result in results:
        probabilities = [p for _, p in result.top]
        assert len(result.top) == 2 and {name for name, _ in result.top} <= set(CLASSES)
        assert probabilities == sorted(probabilities, reverse=True) and 0 < sum(probabilities) <= 1 + 1e-6
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == str(images[0]) and len(lines) == 6
    name, probability = results[0].top[0]
    assert lines[1].split() == [f"{probability:.2%}", name]


def test_top_k_is_capped_at_the_number_of_classes_and_sums_to_one(checkpoint, tmp_path):
    image = write_image(tmp_path / "a.png", (200, 200, 200))
    (result,) = main(PredictConfig(images=[str(image)], checkpoint=str(checkpoint), top_k=10, device="cpu"))
    assert sorted(name for name, _ in result.top) == sorted(CLASSES)
    assert sum(p for _, p in result.top) == pytest.approx(1.0, abs=1e-5)


def test_matches_the_model_on_the_same_pixels(checkpoint, tmp_path):
    """The image is resized/cropped with load_rgb and normalised with the checkpoint's mean/std."""
    pixels = np.random.default_rng(0).integers(0, 256, size=(32, 32, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "noise.png")
    (result,) = main(
        PredictConfig(images=[str(tmp_path / "noise.png")], checkpoint=str(checkpoint), top_k=3, device="cpu")
    )
    torch.manual_seed(0)
    model = build_classifier("mobilenet_v3_small", len(CLASSES)).eval()
    unit = torch.from_numpy(pixels).permute(2, 0, 1)[None].float() / 255
    mean, std = torch.tensor([0.485, 0.456, 0.406]), torch.tensor([0.229, 0.224, 0.225])
    with torch.no_grad():
        expected = model((unit - mean.view(1, 3, 1, 1)) / std.view(1, 3, 1, 1)).softmax(dim=1)[0]
    assert {name: p for name, p in result.top} == pytest.approx(
        {name: float(expected[i]) for i, name in enumerate(CLASSES)}, abs=1e-5
    )


def test_bad_images_get_their_own_line_and_a_failing_exit(checkpoint, tmp_path, capsys):
    good = write_image(tmp_path / "good.png", (30, 30, 30))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not really a jpeg")
    folder = tmp_path / "photos"
    folder.mkdir()
    paths = [good, broken, tmp_path / "missing.png", folder]
    with pytest.raises(SystemExit) as caught:
        run_main(main, PredictConfig, "", [*map(str, paths), "--checkpoint", str(checkpoint), "--device", "cpu"])
    assert caught.value.code == EXIT_USER_ERROR
    captured = capsys.readouterr()
    assert captured.out.splitlines()[0] == str(good)  # the readable image was still classified
    assert captured.err.splitlines() == [
        f"cannot read image {broken}: not an image format Pillow can read — replace or delete the file",
        f"{tmp_path / 'missing.png'}: no such file",
        f"{folder}: is a folder — pass the image files in it (e.g. {folder}/*.jpg)",
        "error: 3 of 4 image(s) could not be classified (the reasons are above)",
    ]


def test_file_names_cannot_drive_the_terminal_or_forge_result_lines(checkpoint, tmp_path, capsys):
    name = "\x1b[2J\nFAKE: 100.00%  cat.png"
    image, unreadable = write_image(tmp_path / name, (0, 0, 0)), tmp_path / f"{name}.jpg"
    unreadable.write_bytes(b"")
    with pytest.raises(UserError):
        main(PredictConfig(images=[str(image), str(unreadable)], checkpoint=str(checkpoint), device="cpu"))
    captured = capsys.readouterr()
    assert "\x1b" not in captured.out + captured.err and captured.out.startswith(f"{tmp_path}/\\x1b[2J\\nFAKE")
    assert not [line for line in (captured.out + captured.err).splitlines() if line.startswith("FAKE")]


def test_images_are_decoded_one_batch_at_a_time(checkpoint, tmp_path, monkeypatch):
    """Each batch is printed before the next is decoded: memory stays one batch's, whatever the number of files."""
    events = []
    decode = predict.load_rgb
    monkeypatch.setattr(predict, "PREDICT_BATCH", 2)
    monkeypatch.setattr(predict, "load_rgb", lambda *args: events.append("decode") or decode(*args))
    monkeypatch.setattr(sys, "stdout", SimpleNamespace(write=lambda text: events.append("print"), flush=lambda: None))
    images = [str(write_image(tmp_path / f"{i}.png", (i, i, i))) for i in range(5)]
    main(PredictConfig(images=images, checkpoint=str(checkpoint), top_k=1, device="cpu"))
    assert re.fullmatch("ddp+ddp+dp+", "".join(event[0] for event in events))  # (decode, decode, print...) x 2, ...


def test_missing_checkpoint_and_bad_arguments_are_user_errors(checkpoint, tmp_path):
    image = str(write_image(tmp_path / "a.png", (0, 0, 0)))
    for cfg, message in [
        (PredictConfig([image], str(tmp_path / "none.safetensors"), device="cpu"), "checkpoint not found"),
        (PredictConfig([], str(checkpoint), device="cpu"), "no images given"),
        (PredictConfig([image], str(checkpoint), top_k=0, device="cpu"), "--top-k must be positive"),
    ]:
        with pytest.raises(UserError, match=message):
            main(cfg)
    assert parse_config(PredictConfig, [image, "--cpu-threads", "2"], "").cpu_threads == 2
