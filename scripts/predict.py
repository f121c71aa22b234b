"""Classify image files with a trained classifier and print the top-k classes with probabilities.

    python scripts/predict.py --checkpoint checkpoints/cats_model.safetensors photo1.jpg photo2.png

Each image is decoded exactly as training data is (`scripts.data.load_rgb` at the checkpoint's image
size: upright, RGB, shorter side resized, centre-cropped) and normalised with the checkpoint's
mean/std. An unreadable image gets its own error line; the others are still classified, and the exit
status is then non-zero.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts.lib.cli import UserError, option, run_main
from scripts.lib.data import to_unit_float
from scripts.lib.data import UnreadableImage, load_rgb
from scripts.lib.checkpoints import classifier_normalize, load_classifier
from scripts.lib.cli import DEVICES, resolve_device_type

# Images per forward pass: bounds memory when many files are passed at once.
PREDICT_BATCH = 64


@dataclass
class PredictConfig:
    images: list[str] = option([], "image files to classify", positional=True)
    checkpoint: str = option("checkpoints/cats_model.safetensors", "classifier weights file (.safetensors or .pt)")
    top_k: int = option(3, "how many of the most likely classes to print per image")
    device: str = option("auto", "where to run the model", choices=DEVICES)


@dataclass
class Prediction:
    path: Path
    top: list[tuple[str, float]]  # (class name, probability), most likely first


def read_images(paths: list[Path], image_size: int) -> tuple[list[Path], list[np.ndarray], list[str]]:
    """(readable paths, their HxWx3 uint8 arrays, one error message per unreadable file)."""
    readable, arrays, errors = [], [], []
    for path in paths:
        if not path.is_file():
            errors.append(f"{path}: no such file")
            continue
        try:
            arrays.append(load_rgb(path, image_size))
            readable.append(path)
        except UnreadableImage as error:
            errors.append(str(error))
    return readable, arrays, errors


@torch.no_grad()
def classify(
    model: torch.nn.Module,
    metadata: dict[str, Any],
    arrays: list[np.ndarray],
    top_k: int,
    device: torch.device | str,
) -> list[list[tuple[str, float]]]:
    """Top-k (class name, probability) for each HxWx3 uint8 image."""
    class_names = metadata["class_names"]
    k = min(top_k, len(class_names))
    results = []
    for start in range(0, len(arrays), PREDICT_BATCH):
        batch = torch.from_numpy(np.stack(arrays[start : start + PREDICT_BATCH])).permute(0, 3, 1, 2).to(device)
        probabilities = model(classifier_normalize(to_unit_float(batch), metadata)).float().softmax(dim=1)
        values, indices = probabilities.topk(k, dim=1)
        results += [
            [(class_names[i], p) for i, p in zip(row_i.tolist(), row_p.tolist(), strict=True)]
            for row_i, row_p in zip(indices, values, strict=True)
        ]
    return results


def main(cfg: PredictConfig) -> list[Prediction]:
    """Print and return the top-k predictions; UserError (after printing the rest) if any image was bad."""
    if not cfg.images:
        raise UserError("no images given — pass one or more image files after the options")
    if cfg.top_k < 1:
        raise UserError(f"--top-k must be positive (got {cfg.top_k})")
    device = resolve_device_type(cfg.device)
    model, metadata = load_classifier(cfg.checkpoint, device=device)
    paths, arrays, errors = read_images([Path(p) for p in cfg.images], metadata["image_size"])
    predictions = [
        Prediction(path, top)
        for path, top in zip(paths, classify(model, metadata, arrays, cfg.top_k, device), strict=True)
    ]
    for prediction in predictions:
        print(prediction.path)
        for name, probability in prediction.top:
            print(f"  {probability:7.2%}  {name}")
    if errors:
        raise UserError(
            f"{len(errors)} of {len(cfg.images)} image(s) could not be classified:\n  " + "\n  ".join(errors)
        )
    return predictions


if __name__ == "__main__":
    run_main(main, PredictConfig, "Print the most likely classes of image files with a trained classifier.")
