"""How good is a trained TinyDiT? Class fidelity, feature-space FID/KID and a memorisation check.

    python scripts/evaluate.py --dit checkpoints/tinydit_final.safetensors \
        --classifier checkpoints/cats_model.safetensors --data data/cats --heldout-data data/cats_heldout

- Class fidelity: N samples per class (classifier-free guidance), classified by the project's classifier;
  per-class and mean accuracy. The classifier's accuracy on held-out REAL images is reported beside it:
  it is the ceiling (a classifier that is 80% right on real cats cannot confirm 100% of the samples).
- FID and KID between the samples and held-out real images in the classifier's penultimate feature
  space. This is NOT Inception FID and is not comparable with numbers in papers; compare it with the
  real-vs-real baseline in the same report (real training images vs the same held-out images, with as
  many images as there are samples), which is what a perfect generator would score here. Inception FID
  (torchvision's Inception-v3) is added when its weights are already in the torch hub cache; nothing is
  ever downloaded.
- Memorisation: distance from each sample to its nearest training image vs the same for held-out real
  images, in pixel space and in classifier-feature space. ratio = median(sample) / median(held-out);
  > 1 means the samples are not closer to the training set than unseen real images are (no copying).

Held-out images: the DiT trains on every image of its data folder, so "held-out" is only clean when it
comes from a folder the DiT never saw: pass `--heldout-data` (`make quality` generates one with another
seed). Without it, the classifier checkpoint's validation split of --data is used (not trained on by
the classifier, but seen by the DiT if the DiT trained on --data); the report marks that as not clean.
All images are compared at the DiT's resolution and resized to the classifier's size the same way.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models.classifier import features_and_logits
from scripts.lib.cli import UserError, option, run_main
from scripts.lib.batches import stratified_split, to_unit_float
from scripts.lib.images import ImageCache, load_or_build_cache
from scripts.lib.inception import inception_report
from scripts.lib.evaluation_report import (
    distance_report,
    memorisation_report,
    print_combined_summary,
    print_summary,
    summarize,
    write_report_json,
)
from scripts.lib.metrics import class_fidelity
from scripts.lib.model_files import classifier_normalize, load_classifier, load_dit
from scripts.lib.runtime import DEVICES, resolve_device_type
from scripts.lib.sampling import SAMPLE_CHUNK, class_grid_labels, sample_images, save_grid

GRID_COLUMNS = 8
FEATURE_FID_NOTE = (
    "classifier-feature FID: Fréchet distance in the project classifier's penultimate feature "
    "space, NOT Inception FID; compare it only with real_vs_real_baseline in this report"
)
MEMORISATION_NOTE = (
    "ratio = median NN distance (sample -> training set) / median NN distance (held-out real -> "
    "training set); > 1: samples are not closer to the training images than unseen real images "
    "are (no copying); near or below 1: possible memorisation"
)


@dataclass
class EvaluateConfig:
    dit: str = option("checkpoints/tinydit_final.safetensors", "TinyDiT weights file to evaluate")
    classifier: str = option("checkpoints/cats_model.safetensors", "the project's classifier weights file")
    data: str = option("data/cats", "image folder the DiT was trained on (the memorisation reference)")
    heldout_data: str = option(
        "",
        "image folder neither model saw (same classes); default: the classifier's "
        "validation split of --data (then not clean for the DiT)",
    )
    num_per_class: int = option(50, "samples per class")
    cfg_scale: float = option(4.0, "classifier-free guidance scale (1 = no guidance)")
    steps: int = option(50, "sampling steps")
    sampler: str | None = option(None, "sampler of the checkpoint's objective (default: the objective's default)")
    seed: int = option(0, "seed of the sampling noise and of the real subsets")
    out: str = option("", "JSON report path (default: <dit file>_eval.json beside the DiT file)")
    grid: str = option("", "PNG grid of samples, one row per class (default: <dit file>_eval_grid.png)")
    device: str = option("auto", "where to run", choices=DEVICES)
    batch_size: int = option(128, "images per classifier / feature batch")
    summarize: list[str] = option(
        [],
        "instead of evaluating: combine these JSON reports (one per data set) into one summary table, written to --out",
    )
    fidelity_bar: float = option(0.9, "the mean class fidelity a data set must reach (the summary's verdict)")


def validate_config(cfg: EvaluateConfig) -> None:
    problems = [
        f"--{name.replace('_', '-')} must be positive (got {value})"
        for name, value in (("num_per_class", cfg.num_per_class), ("steps", cfg.steps), ("batch_size", cfg.batch_size))
        if value < 1
    ]
    if cfg.num_per_class < 2:
        problems.append("--num-per-class must be >= 2 to fit FID/KID statistics")
    if cfg.cfg_scale < 0:
        problems.append(f"--cfg-scale must be >= 0 (got {cfg.cfg_scale})")
    for name in ("dit", "classifier"):
        if not Path(getattr(cfg, name)).is_file():
            raise UserError(f"--{name} {getattr(cfg, name)} does not exist — train it first or pass the right path")
    if problems:
        raise UserError("; ".join(problems))


def default_output(dit_path: str, suffix: str) -> Path:
    path = Path(dit_path)
    return path.with_name(path.stem + suffix)


# ------------------------------------------------------------------------------------------------------
# Real images: the training reference and the held-out set
# ------------------------------------------------------------------------------------------------------


@dataclass
class RealImages:
    """Unit-range images at the DiT's resolution with labels, for the training reference and held-out set."""

    train: torch.Tensor
    train_labels: np.ndarray
    heldout: torch.Tensor
    heldout_labels: np.ndarray
    heldout_source: str
    clean_for_dit: bool


def _cache_for(data_dir: str, image_size: int, class_names: list[str], what: str) -> ImageCache:
    cache = load_or_build_cache(data_dir, image_size, show_progress=True)
    if list(cache.class_names) != list(class_names):
        raise UserError(
            f"{what} {data_dir} has classes {cache.class_names} but the checkpoints know "
            f"{class_names} — evaluate on a folder with the same class subfolders"
        )
    return cache


def _unit(cache: ImageCache, indices: np.ndarray) -> torch.Tensor:
    return to_unit_float(torch.from_numpy(np.ascontiguousarray(cache.images[indices])))


def load_real_images(
    cfg: EvaluateConfig, image_size: int, class_names: list[str], classifier_config: dict[str, Any]
) -> RealImages:
    """Training reference = all of --data (what the DiT saw); held-out from --heldout-data or the val split."""
    cache = _cache_for(cfg.data, image_size, class_names, "--data")
    if cfg.heldout_data:
        heldout = _cache_for(cfg.heldout_data, image_size, class_names, "--heldout-data")
        everything = np.arange(len(cache))
        return RealImages(
            _unit(cache, everything),
            cache.labels[everything],
            _unit(heldout, np.arange(len(heldout))),
            np.asarray(heldout.labels),
            f"folder {cfg.heldout_data}",
            clean_for_dit=True,
        )
    val_fraction = float(classifier_config.get("val_split") or 0.0)
    if val_fraction <= 0:
        raise UserError(
            "the classifier checkpoint records no validation split, so there are no held-out images "
            "in --data — pass --heldout-data DIR (e.g. toy cats drawn with another --seed)"
        )
    # The same split the classifier trainer drew (sorted indices), so held-out was never trained on by it.
    train_idx, val_idx = stratified_split(cache.labels, val_fraction, int(classifier_config.get("seed", 0)))
    return RealImages(
        _unit(cache, train_idx),
        cache.labels[train_idx],
        _unit(cache, val_idx),
        cache.labels[val_idx],
        f"classifier validation split of {cfg.data} (fraction {val_fraction})",
        clean_for_dit=False,
    )


def balanced_subset(labels: np.ndarray, per_class: int, num_classes: int, seed: int) -> np.ndarray:
    """Up to `per_class` random indices of each class, so the baseline has the samples' class mix."""
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in range(num_classes)]
    return np.sort(np.concatenate(chosen))


# ------------------------------------------------------------------------------------------------------
# Features
# ------------------------------------------------------------------------------------------------------


@torch.no_grad()
def classify(
    model: nn.Module,
    metadata: dict[str, Any],
    images_unit: torch.Tensor,
    batch_size: int,
    device: torch.device,
    desc: str,
) -> tuple[np.ndarray, np.ndarray]:
    """(predicted labels (N,), penultimate features (N, D)) at the classifier's own input size."""
    size = int(metadata["image_size"])
    predictions, features = [], []
    for batch in tqdm(images_unit.split(batch_size), desc=desc, unit="batch", leave=False):
        batch = batch.to(device)
        if batch.shape[-1] != size:
            batch = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        batch_features, logits = features_and_logits(model, classifier_normalize(batch, metadata))
        predictions.append(logits.argmax(dim=1).cpu())
        features.append(batch_features.cpu())
    return torch.cat(predictions).numpy(), torch.cat(features).double().numpy()


def generate_samples(
    model: nn.Module, objective, metadata: dict[str, Any], cfg: EvaluateConfig, sampler: str, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit images (C*N, 3, H, W) on CPU, requested labels), class by class, with a progress bar."""
    labels = class_grid_labels(list(range(metadata["num_classes"])), cfg.num_per_class, device)
    chunks = []
    for index, chunk in enumerate(tqdm(labels.split(SAMPLE_CHUNK), desc="sampling", unit="batch")):
        chunks.append(
            sample_images(
                model,
                objective,
                chunk,
                steps=cfg.steps,
                cfg_scale=cfg.cfg_scale,
                sampler=sampler,
                seed=cfg.seed + index,
                image_size=metadata["image_size"],
                in_channels=metadata["in_channels"],
            ).cpu()
        )
    return torch.cat(chunks), labels.cpu()


def write_summary(cfg: EvaluateConfig) -> dict[str, Any]:
    if not cfg.out:
        raise UserError("--summarize needs --out, the path of the summary JSON")
    if not 0 <= cfg.fidelity_bar <= 1:
        raise UserError(f"--fidelity-bar is a fraction in [0, 1] (got {cfg.fidelity_bar})")
    summary = summarize(cfg.summarize, cfg.fidelity_bar)
    out = Path(cfg.out)
    write_report_json(out, summary)
    print_combined_summary(summary)
    print(f"summary -> {out}")
    return summary


@dataclass
class Models:
    dit: nn.Module
    objective: Any
    dit_meta: dict[str, Any]
    classifier: nn.Module
    classifier_meta: dict[str, Any]
    class_names: list[str]
    sampler: str


def load_models(cfg: EvaluateConfig, device: torch.device) -> Models:
    """The DiT and the judge, strictly loaded, refused when they do not share their classes."""
    dit, objective, dit_meta = load_dit(cfg.dit, device=device)
    classifier, classifier_meta = load_classifier(cfg.classifier, device=device)
    class_names = list(dit_meta["class_names"])
    if list(classifier_meta["class_names"]) != class_names:
        raise UserError(
            f"the DiT knows classes {class_names} but the classifier {classifier_meta['class_names']} "
            "— evaluate with a classifier trained on the same classes"
        )
    sampler = cfg.sampler or objective.default_sampler
    if sampler not in objective.samplers:
        raise UserError(f"unknown --sampler {sampler!r} — choose one of {', '.join(objective.samplers)}")
    return Models(dit, objective, dit_meta, classifier, classifier_meta, class_names, sampler)


def judge(
    models: Models,
    samples: torch.Tensor,
    requested: torch.Tensor,
    real: RealImages,
    cfg: EvaluateConfig,
    device: torch.device,
) -> dict[str, Any]:
    """The report's quality sections: class fidelity, feature FID/KID, Inception FID, memorisation."""
    num_classes = len(models.class_names)

    def features(images: torch.Tensor, what: str) -> tuple[np.ndarray, np.ndarray]:
        return classify(models.classifier, models.classifier_meta, images, cfg.batch_size, device, what)

    baseline_idx = balanced_subset(real.train_labels, cfg.num_per_class, num_classes, cfg.seed)
    sample_pred, sample_f = features(samples, "classify samples")
    heldout_pred, heldout_f = features(real.heldout, "classify held-out")
    _, train_f = features(real.train, "training features")
    fidelity = class_fidelity(sample_pred, requested, num_classes)
    return {
        "class_fidelity": {
            **{k: v for k, v in asdict(fidelity).items() if k not in ("per_class", "counts")},
            "per_class": dict(zip(models.class_names, fidelity.per_class, strict=True)),
            "classifier_heldout_accuracy": float((heldout_pred == real.heldout_labels).mean()),
        },
        "classifier_feature_fid": {
            "note": FEATURE_FID_NOTE,
            **distance_report(sample_f, heldout_f, train_f[baseline_idx], cfg.seed),
        },
        "inception_fid": inception_report(samples, real.heldout, real.train[baseline_idx], cfg.batch_size, device),
        "memorisation": {
            "note": MEMORISATION_NOTE,
            "pixel": memorisation_report(
                samples.flatten(1).numpy(), real.heldout.flatten(1).numpy(), real.train.flatten(1).numpy()
            ),
            "classifier_features": memorisation_report(sample_f, heldout_f, train_f),
        },
    }


def main(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate, write the JSON report and the grid, print a summary; returns the report.

    With --summarize: combine existing reports into one summary instead (returns the summary).
    """
    if cfg.summarize:
        return write_summary(cfg)
    validate_config(cfg)
    started = time.perf_counter()
    device = torch.device(resolve_device_type(cfg.device))
    models = load_models(cfg, device)
    meta, class_names = models.dit_meta, models.class_names
    real = load_real_images(cfg, int(meta["image_size"]), class_names, models.classifier_meta.get("config", {}))
    sampling_started = time.perf_counter()
    samples, requested = generate_samples(models.dit, models.objective, meta, cfg, models.sampler, device)
    sampling_seconds = time.perf_counter() - sampling_started
    grid = Path(cfg.grid) if cfg.grid else default_output(cfg.dit, "_eval_grid.png")
    columns = min(GRID_COLUMNS, cfg.num_per_class)
    picked = torch.arange(len(samples)).view(len(class_names), cfg.num_per_class)[:, :columns].flatten()
    save_grid(samples[picked], grid, per_row=columns)

    report = {
        "dit": cfg.dit,
        "classifier": cfg.classifier,
        "data": cfg.data,
        "grid": str(grid),
        "dit_step": meta.get("step"),
        "dit_model": meta.get("model"),
        "image_size": meta["image_size"],
        "classifier_backbone": models.classifier_meta.get("backbone"),
        "classifier_image_size": models.classifier_meta["image_size"],
        "sampling": {
            "num_per_class": cfg.num_per_class,
            "cfg_scale": cfg.cfg_scale,
            "steps": cfg.steps,
            "sampler": models.sampler,
            "seed": cfg.seed,
            "seconds": sampling_seconds,
            "images_per_second": len(samples) / sampling_seconds,
        },
        "heldout": {
            "source": real.heldout_source,
            "count": len(real.heldout),
            "clean_for_dit": real.clean_for_dit,
            "training_reference_count": len(real.train),
        },
        **judge(models, samples, requested, real, cfg, device),
    }
    report["seconds"] = time.perf_counter() - started
    out = Path(cfg.out) if cfg.out else default_output(cfg.dit, "_eval.json")
    write_report_json(out, report)
    print_summary(report)
    print(f"report -> {out}   grid -> {grid}   ({report['seconds']:.0f}s)")
    return report


if __name__ == "__main__":
    run_main(
        main,
        EvaluateConfig,
        "Evaluate a TinyDiT: class fidelity, classifier-feature FID/KID vs a "
        "real-vs-real baseline, and a memorisation check.",
    )
