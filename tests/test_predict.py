"""scripts/predict.py: top-k output from a checkpoint; bad inputs reported per file, with a failing exit."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from models.classifier import build_classifier
from scripts.lib.cli import EXIT_USER_ERROR, UserError, run_main
from scripts.lib.checkpoints import classifier_metadata, save_model
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


def test_bad_images_get_their_own_message_and_a_failing_exit(checkpoint, tmp_path, capsys):
    good = write_image(tmp_path / "good.png", (30, 30, 30))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not really a jpeg")
    missing = tmp_path / "missing.png"
    with pytest.raises(SystemExit) as caught:
        run_main(
            main,
            PredictConfig,
            "test",
            [str(good), str(broken), str(missing), "--checkpoint", str(checkpoint), "--device", "cpu"],
        )
    assert caught.value.code == EXIT_USER_ERROR
    captured = capsys.readouterr()
    assert str(good) in captured.out  # the readable image was still classified
    assert "2 of 3 image(s) could not be classified" in captured.err
    assert f"cannot read image {broken}" in captured.err and f"{missing}: no such file" in captured.err


def test_missing_checkpoint_and_bad_arguments_are_user_errors(checkpoint, tmp_path):
    image = str(write_image(tmp_path / "a.png", (0, 0, 0)))
    with pytest.raises(UserError, match="checkpoint not found"):
        main(PredictConfig(images=[image], checkpoint=str(tmp_path / "none.safetensors"), device="cpu"))
    with pytest.raises(UserError, match="no images given"):
        main(PredictConfig(images=[], checkpoint=str(checkpoint), device="cpu"))
    with pytest.raises(UserError, match="--top-k must be positive"):
        main(PredictConfig(images=[image], checkpoint=str(checkpoint), top_k=0, device="cpu"))
