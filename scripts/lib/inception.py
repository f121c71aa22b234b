"""Inception-v3 FID for `evaluate`: torchvision's ImageNet Inception, from a local weights file only.

Nothing here downloads: without the weights file the report says where to put it and carries on with the
classifier-feature FID, which needs no outside weights.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from scripts.lib.metrics import fid
from scripts.lib.model_files import classifier_normalize

INCEPTION_SIZE = 299


def inception_weights_file() -> Path:
    """Where torchvision keeps Inception-v3 ImageNet weights in the torch hub cache ($TORCH_HOME)."""
    from torchvision.models import Inception_V3_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(Inception_V3_Weights.IMAGENET1K_V1.url).name


def load_inception(device: torch.device) -> nn.Module:
    """torchvision Inception-v3 returning 2048-d pool features, from the LOCAL weights file only."""
    from torchvision.models import inception_v3

    model = inception_v3(weights=None, aux_logits=True, init_weights=False)
    model.load_state_dict(torch.load(inception_weights_file(), map_location="cpu", weights_only=True))
    model.fc = nn.Identity()
    return model.to(device).eval()


@torch.no_grad()
def inception_features(
    model: nn.Module, images_unit: torch.Tensor, batch_size: int, device: torch.device
) -> np.ndarray:
    features = []
    for batch in tqdm(images_unit.split(batch_size), desc="inception features", unit="batch", leave=False):
        batch = F.interpolate(
            batch.to(device),
            size=(INCEPTION_SIZE, INCEPTION_SIZE),
            mode="bilinear",
            antialias=True,
            align_corners=False,
        )
        features.append(model(classifier_normalize(batch)).cpu())
    return torch.cat(features).double().numpy()


def inception_report(
    samples: torch.Tensor, heldout: torch.Tensor, baseline: torch.Tensor, batch_size: int, device: torch.device
) -> dict[str, Any]:
    weights = inception_weights_file()
    if not weights.is_file():
        return {
            "available": False,
            "reason": f"no torchvision Inception-v3 weights at {weights} (this tool never downloads); put "
            f"{weights.name} there (or set TORCH_HOME) to get Inception FID",
        }
    model = load_inception(device)
    sample_f, heldout_f, baseline_f = (
        inception_features(model, images, batch_size, device) for images in (samples, heldout, baseline)
    )
    return {
        "available": True,
        "fid": fid(sample_f, heldout_f),
        "fid_real_vs_real_baseline": fid(baseline_f, heldout_f),
        "note": "torchvision Inception-v3 pool features (2048-d); close to, not identical with, the TF "
        f"Inception of published FIDs, and biased upward at {len(samples)} samples",
    }
