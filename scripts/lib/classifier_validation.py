"""The classifier's validation pass: every process classifies its share of the held-out split, and all
processes end with the same per-image results (predictions, confidences, losses) and confusion matrix."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from scripts.lib.batches import gather_batch, to_unit_float
from scripts.lib.images import ImageCache
from scripts.lib.model_files import classifier_normalize

# Images per forward pass in validation (no gradients, so larger than training batches is fine).
EVAL_BATCH = 128


def model_input(images_unit: torch.Tensor) -> torch.Tensor:
    """What the network sees: ImageNet-normalised images, channels-last (faster convolutions)."""
    return classifier_normalize(images_unit).contiguous(memory_format=torch.channels_last)


@dataclass
class Evaluation:
    """Per-image results on the validation split, identical on every process."""

    indices: np.ndarray  # dataset indices, sorted
    labels: np.ndarray
    predictions: np.ndarray
    confidences: np.ndarray  # softmax probability of the predicted class
    losses: np.ndarray

    @property
    def loss(self) -> float:
        return float(self.losses.mean()) if len(self.losses) else math.nan

    @property
    def accuracy(self) -> float:
        return float((self.predictions == self.labels).mean()) if len(self.labels) else math.nan

    def records(self) -> list[dict[str, Any]]:
        """One JSON-able dict per validation image: index (into the cache), label, prediction, confidence."""
        columns = (self.indices, self.labels, self.predictions, self.confidences)
        return [
            {"index": int(i), "label": int(y), "prediction": int(p), "confidence": float(c)}
            for i, y, p, c in zip(*columns, strict=True)
        ]

    def confusion_matrix(self, num_classes: int) -> np.ndarray:
        """counts[true, predicted]."""
        counts = np.zeros((num_classes, num_classes), dtype=np.int64)
        np.add.at(counts, (self.labels, self.predictions), 1)
        return counts


def share_batchnorm_statistics(raw_model: nn.Module, accelerator) -> None:
    """Give every rank the main process's BatchNorm running statistics.

    DDP sends rank 0's buffers to the others at the start of each forward pass, so after an epoch's last step
    every rank holds statistics of its own shard only; validation on those would not be the saved model's.
    """
    if accelerator.num_processes > 1:
        for buffer in raw_model.buffers():
            torch.distributed.broadcast(buffer, src=0)


@torch.no_grad()
def evaluate(
    raw_model: nn.Module, cache: ImageCache, val_idx: np.ndarray, accelerator, show_progress: bool
) -> Evaluation:
    """Run this process's share of the validation split, then gather every share onto every process.

    Uses the plain module (no DDP wrapper), so ranks with fewer real images need not run the same number
    of forward passes; shares are padded to equal length (index -1) only for the gather.
    """
    rank, world, device = accelerator.process_index, accelerator.num_processes, accelerator.device
    per_rank = math.ceil(len(val_idx) / world)
    mine = val_idx[rank * per_rank : (rank + 1) * per_rank]
    padded = np.full(per_rank, -1, dtype=np.int64)
    padded[: len(mine)] = mine
    unset = torch.full((per_rank,), -1, dtype=torch.int64, device=device)
    results = {
        "index": torch.from_numpy(padded).to(device),
        "label": unset.clone(),
        "prediction": unset.clone(),
        "confidence": torch.zeros(per_rank, device=device),
        "loss": torch.zeros(per_rank, device=device),
    }
    raw_model.eval()
    for start in tqdm(
        range(0, len(mine), EVAL_BATCH), desc="validate", unit="batch", leave=False, disable=not show_progress
    ):
        chunk = mine[start : start + EVAL_BATCH]
        labels = torch.from_numpy(cache.labels[chunk]).to(device)
        with accelerator.autocast():
            logits = raw_model(model_input(to_unit_float(gather_batch(cache.images, chunk).to(device)))).float()
        window = slice(start, start + len(chunk))
        results["label"][window] = labels
        results["confidence"][window], results["prediction"][window] = logits.softmax(dim=1).max(dim=1)
        results["loss"][window] = F.cross_entropy(logits, labels, reduction="none")
    gathered = {name: tensor.cpu().numpy() for name, tensor in accelerator.gather(results).items()}
    keep = gathered["index"] >= 0
    order = np.argsort(gathered["index"][keep])
    return Evaluation(*(gathered[name][keep][order] for name in ("index", "label", "prediction", "confidence", "loss")))


def format_confusion_matrix(counts: np.ndarray, class_names: list[str]) -> str:
    """Rows: true class; columns: predicted class (numbered like the rows); plus per-class accuracy."""
    width = max(5, len(str(counts.max())) + 1)
    name_width = max(len(name) for name in class_names) + 4
    lines = [" " * name_width + "".join(f"{i:>{width}}" for i in range(len(class_names))) + "   accuracy"]
    for i, (name, row) in enumerate(zip(class_names, counts, strict=True)):
        accuracy = row[i] / row.sum() if row.sum() else math.nan
        label = f"{i:>2} {name}"
        lines.append(f"{label:<{name_width}}" + "".join(f"{value:>{width}}" for value in row) + f"   {accuracy:8.1%}")
    return "\n".join(lines)
