"""Builders shared by several test files: tiny toy-cats sets, tiny trainer configs, trained-looking models.

Nothing here downloads or trains for long: toy cats are generated, and "trained" models are fresh ones whose
zero-initialised tensors were nudged, which is all verify/export/evaluate need to exercise their paths.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from models.classifier import build_classifier
from models.tiny_dit import TinyDiT, build_dit
from scripts.make_toy_cats import generate_toy_cats
from scripts.lib.checkpoints import classifier_metadata, dit_metadata, save_model
from scripts.train_dit import TrainDiTConfig

TOY_CLASSES = ["black", "white", "orange_tabby"]


def make_toy_data(root: Path) -> Path:
    """Three classes x 4 toy cats at 16 px: enough to exercise every code path in well under a second."""
    generate_toy_cats(root, per_class=4, size=16, seed=0, classes=TOY_CLASSES)
    return root


def tiny_config(data_dir: Path, output_dir: Path, **overrides) -> TrainDiTConfig:
    """A few steps of T/4 at 16 px on the CPU; every interval small so all periodic paths run."""
    settings = dict(
        data_dir=str(data_dir),
        output_dir=str(output_dir),
        model="T/4",
        image_size=16,
        steps=4,
        batch_size=4,
        lr=1e-3,
        warmup_steps=2,
        save_interval=2,
        sample_interval=1000,
        log_interval=1,
        sample_steps=2,
        device="cpu",
        mixed_precision="no",
    )
    settings.update(overrides)
    return TrainDiTConfig(**settings)


CLASS_NAMES = ["tabby", "black", "ginger"]
DIT_NAME, DIT_SIZE = "T/4", 16
CLASSIFIER_BACKBONE, CLASSIFIER_SIZE = "mobilenet_v3_small", 32


def look_trained(model: nn.Module, seed: int = 0) -> nn.Module:
    """Move every float tensor (zero-init layers, biases, BatchNorm statistics) a little off its init."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for tensor in model.state_dict().values():  # state-dict tensors share storage with the model
            if tensor.is_floating_point():
                tensor.add_(0.02 * torch.randn(tensor.shape, generator=generator))
    return model.eval()


def trained_dit(seed: int = 0) -> TinyDiT:
    """A T/4 DiT at 16 px that looks trained."""
    torch.manual_seed(seed)
    return look_trained(build_dit(DIT_NAME, DIT_SIZE, len(CLASS_NAMES)), seed)


def dit_test_metadata(*, objective: str = "flow", step: int = 100, class_names: list[str] = CLASS_NAMES) -> dict:
    return dit_metadata(
        {"cfg_scale": 2.0},
        model_name=DIT_NAME,
        image_size=DIT_SIZE,
        in_channels=3,
        class_names=class_names,
        objective_name=objective,
        objective_options={},
        step=step,
        weights="ema",
    )


def save_dit(path: Path, model: nn.Module | None = None, **metadata_options) -> Path:
    """Save `model` (default: a trained-looking DiT) with DiT metadata (see dit_test_metadata for options)."""
    return save_model(path, model if model is not None else trained_dit(), dit_test_metadata(**metadata_options))


def trained_classifier(seed: int = 0) -> nn.Module:
    """A small torchvision classifier that looks trained."""
    torch.manual_seed(seed)
    return look_trained(build_classifier(CLASSIFIER_BACKBONE, len(CLASS_NAMES)), seed)


def save_classifier(path: Path, model: nn.Module | None = None, *, epoch: int = 1, data_dir: str | None = None) -> Path:
    metadata = classifier_metadata(
        {"data_dir": data_dir},
        backbone=CLASSIFIER_BACKBONE,
        image_size=CLASSIFIER_SIZE,
        class_names=CLASS_NAMES,
        metrics={"val_accuracy": 0.5},
        epoch=epoch,
    )
    return save_model(path, model if model is not None else trained_classifier(), metadata)


def one_error_line(main, config_cls, argv: list[str], capsys) -> str:
    """Run a command's real command line; it must exit 2 with exactly one `error:` line. Returns that line."""
    import pytest

    from scripts.lib.cli import EXIT_USER_ERROR, run_main

    capsys.readouterr()
    with pytest.raises(SystemExit) as exited:
        run_main(main, config_cls, "test", argv)
    assert exited.value.code == EXIT_USER_ERROR
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
    return lines[0]


def read_status(run_dir: Path) -> dict:
    """A run's status.json, as a launcher reads it."""
    return json.loads((Path(run_dir) / "status.json").read_text())
