"""Export the cat classifier to ONNX (dynamic batch) with a JSON sidecar, and prove the export faithful.

    python scripts/export_onnx.py --checkpoint checkpoints/cats_model.safetensors --verify --images data/cats

The graph maps normalised images (B, 3, H, W) float32 to logits (B, classes); the sidecar (`cats_model.json`) holds
the class names, image size and preprocessing. `--verify` adds top-1 agreement on real images to the parity check."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts.lib.checkpoints import classifier_normalize, load_classifier
from scripts.lib.cli import UserError, cpu_threads_option, option, printable, run_main
from scripts.lib.cli import IMAGE_EXTENSIONS, is_hidden_name
from scripts.lib.data import UnreadableImage, load_rgb, unit_batch
from scripts.lib.onnx_export import (
    DEFAULT_OPSET, PARITY_BATCH_SIZES, PARITY_TOLERANCE, export_with_dynamic_batch, verify_export, write_sidecar,
)  # fmt: skip

INPUT_NAME, OUTPUT_NAME = "images", "logits"


@dataclass
class ExportClassifierConfig:
    checkpoint: str = option("checkpoints/cats_model.safetensors", "classifier weights file to export")
    output: str = option("checkpoints/cats_model.onnx", "ONNX file to write (the JSON sidecar goes beside it)")
    verify: bool = option(
        False, f"onnx.checker, onnxruntime vs PyTorch (fail above {PARITY_TOLERANCE:g}), top-1 agreement on images"
    )
    images: str | None = option(
        None, "folder searched recursively for the top-1 check's images; default: the training data_dir, if here"
    )
    max_images: int = option(64, "at most this many images for the top-1 check (spread over the folder)")
    opset: int = option(DEFAULT_OPSET, "ONNX opset; lower it for a runtime that lacks opset 23")
    seed: int = option(0, "seed of the random parity inputs")
    cpu_threads: int = cpu_threads_option()


def classifier_sidecar(metadata: dict[str, Any], onnx_name: str) -> dict[str, Any]:
    """Everything a runtime needs besides the graph: inputs, classes and the exact preprocessing."""
    size, classes = metadata["image_size"], metadata["num_classes"]
    return {
        "format": "tiny-cats-onnx-classifier", "kind": "classifier", "onnx": onnx_name,
        "backbone": metadata["backbone"],
        "inputs": {INPUT_NAME: {"shape": ["batch", 3, size, size], "dtype": "float32", "layout": "NCHW, RGB"}},
        "outputs": {OUTPUT_NAME: {"shape": ["batch", classes], "dtype": "float32"}},
        "image_size": size, "num_classes": classes, "class_names": metadata["class_names"],
        "preprocessing": {
            "resize": f"shorter side to {size} (bicubic), centre crop {size}x{size}", "scale": "pixel / 255",
            "normalize": "(x - mean) / std per channel", **metadata["normalization"],
        },
        "epoch": metadata.get("epoch"), "metrics": metadata.get("metrics"),
    }  # fmt: skip


def real_images(cfg: ExportClassifierConfig, metadata: dict[str, Any]) -> torch.Tensor | None:
    """Up to --max-images images of --images (default: the training data_dir, when it is here), spread evenly over
    the sorted list so every class is in, normalised as in evaluation; None when there is no folder to read."""
    folder = cfg.images or (metadata.get("config") or {}).get("data_dir")
    if not folder or not Path(folder).is_dir():
        return None
    listed = (p for p in Path(folder).rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    files = sorted(p for p in listed if not any(map(is_hidden_name, p.relative_to(folder).parts)))  # macOS ._x.jpg
    stride, arrays = max(1, len(files) // max(cfg.max_images, 1)), []
    for path in files[::stride][: cfg.max_images]:
        try:
            arrays.append(load_rgb(path, metadata["image_size"]))
        except UnreadableImage as error:
            print(f"  skipping unreadable image: {error}")
    if not arrays:
        raise UserError("no readable image for the top-1 check — pass --images with a folder of images")
    return classifier_normalize(unit_batch(arrays), metadata)


def top1_disagreements(torch_logits: np.ndarray, onnx_logits: np.ndarray, tolerance: float) -> int:
    """Images whose top-1 class differs, not counting near-ties (top-2 margin within the numeric tolerance)."""
    top2 = np.sort(torch_logits, axis=1)[:, -2:]
    near_tie = (top2[:, 1] - top2[:, 0]) <= 2 * tolerance
    return int(np.sum((torch_logits.argmax(1) != onnx_logits.argmax(1)) & ~near_tie))


def main(cfg: ExportClassifierConfig) -> dict[str, Any]:
    model, metadata = load_classifier(cfg.checkpoint)  # refuses a missing file: never exports random weights
    if cfg.verify and cfg.images and not Path(cfg.images).is_dir():
        raise UserError(f"--images {printable(cfg.images)}: no such folder")
    output, size = Path(cfg.output), metadata["image_size"]
    print(f"exporting {metadata['backbone']} classifier ({size} px, {metadata['num_classes']} classes) -> {output}")
    export_with_dynamic_batch(model, (torch.zeros((2, 3, size, size)),), [INPUT_NAME], OUTPUT_NAME, output, cfg.opset)
    summary = write_sidecar(output, classifier_sidecar(metadata, output.name))
    if not cfg.verify:
        return summary
    generator = torch.Generator().manual_seed(cfg.seed)
    random_images = (torch.rand((n, 3, size, size), generator=generator) for n in PARITY_BATCH_SIZES)
    batches = [{INPUT_NAME: classifier_normalize(images, metadata)} for images in random_images]
    session, summary["max_abs_diff"] = verify_export("classifier", model, output, batches, cfg.cpu_threads)
    if (images := real_images(cfg, metadata)) is None:
        print("  top-1 on real images: skipped (no --images and the training data_dir is not here)")
        return summary
    with torch.no_grad():
        expected = model(images).numpy()
    actual = session.run(None, {INPUT_NAME: images.numpy()})[0]
    summary["top1_agreement"] = agreement = float(np.mean(expected.argmax(1) == actual.argmax(1)))
    print(f"  top-1 agreement on {len(images)} real images: {agreement:.1%}")
    if top1_disagreements(expected, actual, PARITY_TOLERANCE):
        raise UserError(f"ONNX and PyTorch predict different classes on real images (agreement {agreement:.1%})")
    return summary


if __name__ == "__main__":
    run_main(main, ExportClassifierConfig, "Export the cat classifier to ONNX and check it against PyTorch.")
