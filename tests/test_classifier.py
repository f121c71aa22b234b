"""models/classifier.py: every backbone gets our head, penultimate features feed it, offline is clear."""

from __future__ import annotations

import urllib.error

import pytest
import torch
from torchvision import models as tv

from models.classifier import (
    BACKBONES,
    PretrainedWeightsUnavailable,
    build_classifier,
    features_and_logits,
    pretrained_weights_file,
)


@pytest.fixture
def offline_hub(tmp_path, monkeypatch):
    """An empty torch.hub cache and a network that refuses every download."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError(f"no network for {url}")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    return tmp_path / "torch" / "hub" / "checkpoints"


def test_backbones_cover_the_agreed_architectures():
    assert {
        "resnet18",
        "resnet34",
        "resnet50",
        "mobilenet_v3_small",
        "efficientnet_b0",
        "convnext_tiny",
    } <= set(BACKBONES)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_every_backbone_gets_a_head_for_our_classes(backbone):
    torch.manual_seed(0)
    model = build_classifier(backbone, num_classes=5).eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        logits = model(images)
        features, same_pass_logits = features_and_logits(model, images)
    assert logits.shape == (2, 5)
    torch.testing.assert_close(same_pass_logits, logits)
    assert features.ndim == 2 and features.shape[0] == 2
    # The features are exactly what the new head turns into the logits.
    head = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    assert head.out_features == 5 and head.in_features == features.shape[1]
    torch.testing.assert_close(head(features), logits)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError, match="unknown backbone"):
        build_classifier("vgg11", 3)
    with pytest.raises(ValueError, match="num_classes"):
        build_classifier("resnet18", 0)


def test_offline_pretrained_names_the_file_to_provide(offline_hub):
    with pytest.raises(PretrainedWeightsUnavailable) as caught:
        build_classifier("resnet18", 3, pretrained=True)
    error = caught.value
    assert error.weights_file == offline_hub / "resnet18-f37072fd.pth"
    assert error.weights_file == pretrained_weights_file("resnet18")
    assert "no network" in error.reason


def test_pretrained_weights_placed_in_the_cache_are_used_without_network(offline_hub):
    imagenet_like = tv.mobilenet_v3_small(weights=None)
    with torch.no_grad():
        imagenet_like.features[0][0].weight.fill_(0.25)
    offline_hub.mkdir(parents=True)
    torch.save(imagenet_like.state_dict(), pretrained_weights_file("mobilenet_v3_small"))
    model = build_classifier("mobilenet_v3_small", 4, pretrained=True)
    assert torch.all(model.features[0][0].weight == 0.25)
    assert model.classifier[-1].out_features == 4
