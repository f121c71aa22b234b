"""Export the cat classifier to ONNX (dynamic batch) with a JSON sidecar, and prove the export faithful.

    python scripts/export_onnx.py --checkpoint checkpoints/cats_model.safetensors \
        --output checkpoints/cats_model.onnx --verify --images data/cats

The graph maps normalised images (B, 3, H, W) float32 to logits (B, classes). The sidecar
(`cats_model.json`) holds the class names, image size and the preprocessing (resize/crop, /255, ImageNet
mean/std). `--verify` runs onnx.checker, compares ONNX Runtime with PyTorch on random inputs at several
batch sizes (fails above 1e-4) and checks top-1 agreement on real images.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from scripts.lib.cli import UserError, option, run_main
from scripts.lib.data import UnreadableImage, load_rgb
from scripts.lib.data import IMAGE_EXTENSIONS
from scripts.lib.checkpoints import classifier_normalize, load_classifier
from scripts.lib.onnx_export import (
    DEFAULT_OPSET,
    PARITY_BATCH_SIZES,
    PARITY_TOLERANCE,
    check_export,
    export_with_dynamic_batch,
    file_size,
    format_size,
    write_sidecar,
)

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
SIDECAR_FORMAT = "tiny-cats-onnx-classifier"


@dataclass
class ExportClassifierConfig:
    checkpoint: str = option("checkpoints/cats_model.safetensors", "classifier weights file to export")
    output: str = option("checkpoints/cats_model.onnx", "ONNX file to write (the JSON sidecar goes beside it)")
    verify: bool = option(
        False,
        "onnx.checker + ONNX Runtime vs PyTorch on random inputs (fail above "
        f"{PARITY_TOLERANCE:g}) + top-1 agreement on real images",
    )
    images: str | None = option(
        None,
        "folder searched recursively for images for the top-1 check; default: the "
        "data_dir of the checkpoint's training config, when it exists",
    )
    max_images: int = option(64, "at most this many images for the top-1 check (spread over the folder)")
    opset: int = option(DEFAULT_OPSET, "ONNX opset; lower it for a runtime that lacks opset 23")
    seed: int = option(0, "seed of the random parity inputs")


def classifier_sidecar(metadata: dict[str, Any], onnx_name: str) -> dict[str, Any]:
    """Everything a runtime needs besides the graph: inputs, classes and the exact preprocessing."""
    size = metadata["image_size"]
    return {
        "format": SIDECAR_FORMAT,
        "kind": "classifier",
        "onnx": onnx_name,
        "backbone": metadata["backbone"],
        "inputs": {INPUT_NAME: {"shape": ["batch", 3, size, size], "dtype": "float32", "layout": "NCHW, RGB"}},
        "outputs": {OUTPUT_NAME: {"shape": ["batch", metadata["num_classes"]], "dtype": "float32"}},
        "image_size": size,
        "num_classes": metadata["num_classes"],
        "class_names": metadata["class_names"],
        "preprocessing": {
            "resize": f"shorter side to {size} (bicubic), centre crop {size}x{size}",
            "scale": "pixel / 255",
            "normalize": "(x - mean) / std per channel",
            **metadata["normalization"],
        },
        "epoch": metadata.get("epoch"),
        "metrics": metadata.get("metrics"),
    }


def find_images(folder: Path, limit: int) -> list[Path]:
    """Up to `limit` image files under `folder`, spread evenly over the sorted list (so over all classes)."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())
    stride = max(1, len(files) // max(limit, 1))
    return files[::stride][:limit]


def image_folder_for_check(cfg: ExportClassifierConfig, metadata: dict[str, Any]) -> Path | None:
    if cfg.images:
        folder = Path(cfg.images)
        if not folder.is_dir():
            raise UserError(f"--images {folder}: no such folder")
        return folder
    data_dir = (metadata.get("config") or {}).get("data_dir")
    return Path(data_dir) if data_dir and Path(data_dir).is_dir() else None


def load_normalized(paths: list[Path], metadata: dict[str, Any]) -> torch.Tensor:
    """Images as the classifier sees them in evaluation: load_rgb at its size, /255, mean/std."""
    arrays = []
    for path in paths:
        try:
            arrays.append(load_rgb(path, metadata["image_size"]))
        except UnreadableImage as error:
            print(f"  skipping unreadable image: {error}")
    if not arrays:
        raise UserError("no readable image for the top-1 check — pass --images with a folder of images")
    unit = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255
    return classifier_normalize(unit, metadata)


def top1_disagreements(torch_logits: np.ndarray, onnx_logits: np.ndarray, tolerance: float) -> int:
    """Images whose top-1 class differs, not counting near-ties (top-2 margin within the numeric tolerance)."""
    top2 = np.sort(torch_logits, axis=1)[:, -2:]
    near_tie = (top2[:, 1] - top2[:, 0]) <= 2 * tolerance
    differs = torch_logits.argmax(1) != onnx_logits.argmax(1)
    return int(np.sum(differs & ~near_tie))


def check_top1_on_images(model: torch.nn.Module, session, images: torch.Tensor) -> float:
    """Top-1 agreement between PyTorch and ONNX Runtime; UserError on a real (non-tie) disagreement."""
    with torch.no_grad():
        expected = model(images).numpy()
    actual = session.run(None, {INPUT_NAME: images.numpy()})[0]
    agreement = float(np.mean(expected.argmax(1) == actual.argmax(1)))
    print(f"  top-1 agreement on {len(images)} real images: {agreement:.1%}")
    if top1_disagreements(expected, actual, PARITY_TOLERANCE):
        raise UserError(f"ONNX and PyTorch predict different classes on real images (agreement {agreement:.1%})")
    return agreement


def verify_export(
    model: torch.nn.Module, metadata: dict[str, Any], path: Path, cfg: ExportClassifierConfig
) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(cfg.seed)
    size = metadata["image_size"]
    batches = [
        {INPUT_NAME: classifier_normalize(torch.rand((n, 3, size, size), generator=generator), metadata)}
        for n in PARITY_BATCH_SIZES
    ]
    session, worst = check_export("classifier", model, path, batches)
    result: dict[str, Any] = {"max_abs_diff": worst}
    folder = image_folder_for_check(cfg, metadata)
    if folder is None:
        print("  top-1 on real images: skipped (no --images and the training data_dir is not here)")
        return result
    result["top1_agreement"] = check_top1_on_images(
        model, session, load_normalized(find_images(folder, cfg.max_images), metadata)
    )
    return result


def main(cfg: ExportClassifierConfig) -> dict[str, Any]:
    """Export (and optionally verify) the classifier; returns paths and the verification numbers."""
    model, metadata = load_classifier(cfg.checkpoint)
    output = Path(cfg.output)
    size = metadata["image_size"]
    example = torch.zeros((2, 3, size, size))
    print(f"exporting {metadata['backbone']} classifier ({size} px, {metadata['num_classes']} classes) -> {output}")
    export_with_dynamic_batch(model, (example,), [INPUT_NAME], OUTPUT_NAME, output, cfg.opset)
    sidecar = write_sidecar(output, classifier_sidecar(metadata, output.name))
    print(f"  wrote {output} ({format_size(file_size(output))}) and {sidecar}")
    summary: dict[str, Any] = {"onnx": str(output), "sidecar": str(sidecar)}
    if cfg.verify:
        summary.update(verify_export(model, metadata, output, cfg))
    return summary


if __name__ == "__main__":
    run_main(main, ExportClassifierConfig, "Export the cat classifier to ONNX and check it against PyTorch.")
