"""Image classifiers: a torchvision backbone with a fresh head for our classes.

`build_classifier("resnet18", num_classes=6)` gives a randomly initialised network;
`pretrained=True` starts from torchvision's ImageNet weights, which are downloaded once into
`$TORCH_HOME/hub/checkpoints/` (default `~/.cache/torch/hub/checkpoints/`). Offline and without that
file the build raises `PretrainedWeightsUnavailable`, whose message names the exact file to put there.
This module knows nothing about training or files on disk beyond that cache.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from torchvision import models as tv

# name -> (constructor, ImageNet weights enum). The names double as the trainer's --backbone choices.
_REGISTRY: dict[str, tuple[Callable[..., nn.Module], tv.WeightsEnum]] = {
    "resnet18": (tv.resnet18, tv.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (tv.resnet34, tv.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (tv.resnet50, tv.ResNet50_Weights.IMAGENET1K_V2),
    "mobilenet_v3_small": (tv.mobilenet_v3_small, tv.MobileNet_V3_Small_Weights.IMAGENET1K_V1),
    "efficientnet_b0": (tv.efficientnet_b0, tv.EfficientNet_B0_Weights.IMAGENET1K_V1),
    "convnext_tiny": (tv.convnext_tiny, tv.ConvNeXt_Tiny_Weights.IMAGENET1K_V1),
}
BACKBONES = tuple(_REGISTRY)


class PretrainedWeightsUnavailable(RuntimeError):
    """ImageNet weights are neither cached nor downloadable (typically: no internet)."""

    def __init__(self, backbone: str, weights_file: Path, reason: str):
        super().__init__(f"pretrained {backbone} weights are not available ({reason}); expected them at {weights_file}")
        self.backbone = backbone
        self.weights_file = weights_file
        self.reason = reason


def _check_backbone(backbone: str) -> None:
    if backbone not in _REGISTRY:
        raise ValueError(f"unknown backbone {backbone!r}; choose one of {', '.join(BACKBONES)}")


def pretrained_weights_file(backbone: str) -> Path:
    """Where torch.hub caches (and looks for) the ImageNet weights of `backbone`."""
    _check_backbone(backbone)
    url = _REGISTRY[backbone][1].url
    return Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(url)


def _imagenet_state_dict(backbone: str) -> dict[str, torch.Tensor]:
    """The ImageNet state dict from the torch.hub cache, downloading it when it is not there yet."""
    weights = _REGISTRY[backbone][1]
    try:
        return torch.hub.load_state_dict_from_url(weights.url, progress=True, check_hash=True, weights_only=True)
    except OSError as error:  # URLError is one: no file and no network
        raise PretrainedWeightsUnavailable(backbone, pretrained_weights_file(backbone), str(error)) from error


def build_classifier(backbone: str, num_classes: int, pretrained: bool = False) -> nn.Module:
    """A torchvision `backbone` whose last Linear layer is replaced by a fresh `num_classes`-way one."""
    _check_backbone(backbone)
    if num_classes < 1:
        raise ValueError(f"num_classes must be positive, got {num_classes}")
    constructor = _REGISTRY[backbone][0]
    model = constructor(weights=None)
    if pretrained:
        model.load_state_dict(_imagenet_state_dict(backbone))
    is_resnet = isinstance(getattr(model, "fc", None), nn.Linear)  # the head: `fc`, or the others' classifier[-1]
    parent, name = (model, "fc") if is_resnet else (model.classifier, str(len(model.classifier) - 1))
    setattr(parent, name, nn.Linear(getattr(parent, name).in_features, num_classes))
    return model


def features_and_logits(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, D) input of the classification head and (B, classes) logits, from one forward pass.

    `x` is normalised like the training inputs.
    """
    captured: list[torch.Tensor] = []
    head = [module for module in model.modules() if isinstance(module, nn.Linear)][-1]  # the last Linear, any backbone
    hook = head.register_forward_hook(lambda _module, inputs, _output: captured.append(inputs[0]))
    try:
        logits = model(x)
    finally:
        hook.remove()
    return captured[0].flatten(1), logits
