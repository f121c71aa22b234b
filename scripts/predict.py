"""Classify image files with a trained classifier and print the top-k classes with probabilities.

    python scripts/predict.py --checkpoint checkpoints/cats_model.safetensors photo1.jpg photo2.png

Each image is decoded and normalised exactly as training data is (`load_rgb`, the checkpoint's mean/std). An
unreadable file gets its own line on stderr; the others are still classified, and the exit status is then 2.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from scripts.lib.checkpoints import classifier_normalize, load_classifier
from scripts.lib.cli import DEVICES, UserError, cpu_threads_option, option, printable, resolve_device_type, run_main
from scripts.lib.data import load_rgb, unit_batch

# Images decoded, classified and printed at a time: memory stays that of one batch however many files are passed.
PREDICT_BATCH = 64


@dataclass
class PredictConfig:
    images: list[str] = option([], "image files to classify", positional=True)
    checkpoint: str = option("checkpoints/cats_model.safetensors", "classifier weights file (.safetensors or .pt)")
    top_k: int = option(3, "how many of the most likely classes to print per image")
    device: str = option("auto", "where to run the model", choices=DEVICES)
    cpu_threads: int = cpu_threads_option()


@dataclass
class Prediction:
    path: Path
    top: list[tuple[str, float]]  # (class name, probability), most likely first


def decode(path: Path, image_size: int) -> np.ndarray:
    if path.is_dir():
        raise UserError(f"{printable(path)}: is a folder — pass the image files in it (e.g. {printable(path)}/*.jpg)")
    if not path.is_file():
        raise UserError(f"{printable(path)}: no such file")
    return load_rgb(path, image_size)


@torch.no_grad()
def main(cfg: PredictConfig) -> list[Prediction]:
    """Print and return the top-k predictions, a batch at a time; UserError at the end if any image was bad."""
    if not cfg.images:
        raise UserError("no images given — pass one or more image files after the options")
    if cfg.top_k < 1:
        raise UserError(f"--top-k must be positive (got {cfg.top_k})")
    device = resolve_device_type(cfg.device)
    model, metadata = load_classifier(cfg.checkpoint, device=device)
    names, paths, predictions, failures = metadata["class_names"], [Path(p) for p in cfg.images], [], 0
    for start in range(0, len(paths), PREDICT_BATCH):
        readable, arrays = [], []
        for path in paths[start : start + PREDICT_BATCH]:
            try:
                arrays.append(decode(path, metadata["image_size"]))
                readable.append(path)
            except UserError as error:  # UnreadableImage is one
                print(error, file=sys.stderr)
                failures += 1
        if not arrays:
            continue
        probabilities = model(classifier_normalize(unit_batch(arrays, device), metadata)).float().softmax(dim=1)
        values, indices = probabilities.topk(min(cfg.top_k, len(names)), dim=1)
        for path, row_p, row_i in zip(readable, values.tolist(), indices.tolist(), strict=True):
            predictions.append(Prediction(path, [(names[i], p) for i, p in zip(row_i, row_p, strict=True)]))
            lines = [printable(path), *(f"  {p:7.2%}  {name}" for name, p in predictions[-1].top)]
            print("\n".join(lines), flush=True)
    if failures:
        raise UserError(f"{failures} of {len(paths)} image(s) could not be classified (the reasons are above)")
    return predictions


if __name__ == "__main__":
    run_main(main, PredictConfig, "Print the most likely classes of image files with a trained classifier.")
