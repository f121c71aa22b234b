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

import json
import math
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
from scripts.lib.checkpoints import classifier_normalize, load_classifier, load_dit
from scripts.lib.cli import DEVICES, UserError, option, resolve_device_type, run_main, write_atomic
from scripts.lib.data import ImageCache, load_or_build_cache, stratified_split, to_unit_float
from scripts.lib.sampling import SAMPLE_CHUNK, class_grid_labels, sample_images, save_grid

# ====================================================================================================
# Pure metric functions for judging generated images: FID, KID, memorisation and class fidelity.
# ====================================================================================================


ArrayLike = np.ndarray | torch.Tensor


def _as_float64(features: ArrayLike) -> np.ndarray:
    array = features.detach().cpu().numpy() if isinstance(features, torch.Tensor) else np.asarray(features)
    array = array.astype(np.float64, copy=False)
    if array.ndim != 2:
        raise ValueError(f"features must be a 2-D (N, D) matrix, got shape {array.shape}")
    return array


def gaussian_fit(features: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), covariance (D, D)) of an (N, D) feature matrix, N >= 2, unbiased covariance."""
    array = _as_float64(features)
    if len(array) < 2:
        raise ValueError(f"need at least 2 feature vectors to fit a Gaussian, got {len(array)}")
    return array.mean(axis=0), np.cov(array, rowvar=False).reshape(array.shape[1], array.shape[1])


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric PSD matrix; tiny negative eigenvalues (round-off) are clipped to 0."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0, None))) @ eigenvectors.T


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2)."""
    sqrt1 = _psd_sqrt(sigma1)
    middle = sqrt1 @ sigma2 @ sqrt1
    trace_sqrt_product = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    diff = mu1 - mu2
    value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product
    return float(max(value, 0.0))  # the true distance is >= 0; round-off can dip a hair below


def fid(features_a: ArrayLike, features_b: ArrayLike) -> float:
    """FID between two (N, D) feature sets (the same formula as Inception FID, in whatever feature space)."""
    return frechet_distance(*gaussian_fit(features_a), *gaussian_fit(features_b))


def _polynomial_kernel(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a @ b.T / a.shape[1] + 1.0) ** 3


def mmd2_unbiased(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Unbiased MMD^2 (cubic polynomial kernel) between two sets of >= 2 rows each."""
    m, n = len(features_a), len(features_b)
    k_aa = _polynomial_kernel(features_a, features_a)
    k_bb = _polynomial_kernel(features_b, features_b)
    k_ab = _polynomial_kernel(features_a, features_b)
    within_a = (k_aa.sum() - np.trace(k_aa)) / (m * (m - 1))
    within_b = (k_bb.sum() - np.trace(k_bb)) / (n * (n - 1))
    return float(within_a + within_b - 2 * k_ab.mean())


@dataclass(frozen=True)
class KidResult:
    mean: float
    std: float
    subset_size: int
    num_subsets: int


def kid(
    features_a: ArrayLike, features_b: ArrayLike, num_subsets: int = 50, subset_size: int = 1000, seed: int = 0
) -> KidResult:
    """KID: unbiased MMD^2 averaged over `num_subsets` random subsets (size capped by the smaller set)."""
    a, b = _as_float64(features_a), _as_float64(features_b)
    size = min(subset_size, len(a), len(b))
    if size < 2:
        raise ValueError(f"KID needs at least 2 feature vectors per set, got {len(a)} and {len(b)}")
    rng = np.random.default_rng(seed)
    values = np.array(
        [
            mmd2_unbiased(a[rng.choice(len(a), size, replace=False)], b[rng.choice(len(b), size, replace=False)])
            for _ in range(num_subsets)
        ]
    )
    return KidResult(mean=float(values.mean()), std=float(values.std()), subset_size=size, num_subsets=num_subsets)


def nearest_neighbour_distances(queries: ArrayLike, references: ArrayLike, chunk: int = 1024) -> np.ndarray:
    """(Q,) Euclidean distance from each query row to its nearest reference row (flatten images first)."""
    query = torch.from_numpy(_as_float64(queries))
    reference = torch.from_numpy(_as_float64(references))
    if query.shape[1] != reference.shape[1]:
        raise ValueError(f"queries have {query.shape[1]} features but references {reference.shape[1]}")
    # Chunks bound the (chunk, R) distance matrix; float64 keeps small distances exact enough to compare.
    minima = [torch.cdist(part, reference).min(dim=1).values for part in query.split(chunk)]
    return torch.cat(minima).numpy()


def memorisation_ratio(sample_nn: np.ndarray, heldout_nn: np.ndarray) -> float:
    """median(sample NN distance) / median(held-out NN distance); > 1 means samples are not copies."""
    heldout_median = float(np.median(heldout_nn))
    if heldout_median == 0.0:
        return float("inf") if float(np.median(sample_nn)) > 0 else float("nan")
    return float(np.median(sample_nn)) / heldout_median


@dataclass(frozen=True)
class ClassFidelity:
    per_class: list[float]  # accuracy for each requested class (NaN when no sample asked for it)
    counts: list[int]  # samples requested per class
    mean: float  # mean of the per-class accuracies (classes with samples)
    overall: float  # fraction of all samples recognised as their requested class


def class_fidelity(predicted: ArrayLike, requested: ArrayLike, num_classes: int) -> ClassFidelity:
    """How often the classifier recognises each sample as the class it was generated for."""
    predicted = np.asarray(predicted.cpu() if isinstance(predicted, torch.Tensor) else predicted).reshape(-1)
    requested = np.asarray(requested.cpu() if isinstance(requested, torch.Tensor) else requested).reshape(-1)
    if predicted.shape != requested.shape:
        raise ValueError(f"{len(predicted)} predictions for {len(requested)} requested labels")
    correct = predicted == requested
    counts = np.bincount(requested, minlength=num_classes)[:num_classes]
    hits = np.bincount(requested, weights=correct, minlength=num_classes)[:num_classes]
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = hits / counts
    present = counts > 0
    return ClassFidelity(
        per_class=[float(value) for value in per_class],
        counts=[int(c) for c in counts],
        mean=float(per_class[present].mean()) if present.any() else float("nan"),
        overall=float(correct.mean()) if len(correct) else float("nan"),
    )


# ====================================================================================================
# Inception-v3 FID for `evaluate`: torchvision's ImageNet Inception, from a local weights file only.
# ====================================================================================================


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


# ====================================================================================================
# evaluate.py's report: its distance and memorisation sections, its printed summary, and the summary of
# ====================================================================================================


KID_SUBSET_SIZE = 1000  # the usual KID subset size, when there are enough images


def distance_report(
    sample_features: np.ndarray, heldout_features: np.ndarray, baseline_features: np.ndarray, seed: int
) -> dict[str, Any]:
    """FID and KID of samples vs held-out, beside the same for real (training) images vs held-out."""
    # Subsets of half the smaller set: with subsets as big as the sets every draw is identical and the
    # spread over subsets (kid_std) would always read 0.
    smallest = min(len(sample_features), len(baseline_features), len(heldout_features))
    subset = max(2, min(KID_SUBSET_SIZE, smallest // 2))
    sample_kid = kid(sample_features, heldout_features, subset_size=subset, seed=seed)
    baseline_kid = kid(baseline_features, heldout_features, subset_size=subset, seed=seed)
    return {
        "fid": fid(sample_features, heldout_features),
        "fid_real_vs_real_baseline": fid(baseline_features, heldout_features),
        "kid": sample_kid.mean,
        "kid_std": sample_kid.std,
        "kid_real_vs_real_baseline": baseline_kid.mean,
        "kid_real_vs_real_baseline_std": baseline_kid.std,
        "kid_subset_size": sample_kid.subset_size,
        "kid_subsets": sample_kid.num_subsets,
        "num_samples": len(sample_features),
        "num_baseline_real": len(baseline_features),
        "num_heldout": len(heldout_features),
        "feature_dim": int(sample_features.shape[1]),
    }


def memorisation_report(samples: np.ndarray, heldout: np.ndarray, train: np.ndarray) -> dict[str, float]:
    sample_nn = nearest_neighbour_distances(samples, train)
    heldout_nn = nearest_neighbour_distances(heldout, train)
    return {
        "ratio": memorisation_ratio(sample_nn, heldout_nn),
        "sample_nn_median": float(np.median(sample_nn)),
        "heldout_nn_median": float(np.median(heldout_nn)),
        "sample_nn_min": float(sample_nn.min()),
    }


def _json_safe(value: Any) -> Any:
    """JSON has no NaN/inf: write them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


def write_report_json(path: Path, data: dict[str, Any]) -> None:
    """A report or a summary as indented JSON (NaN/inf as null), written whole or not at all."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, json.dumps(_json_safe(data), indent=2) + "\n")


def print_summary(report: dict[str, Any]) -> None:
    fidelity, features, pixel = report["class_fidelity"], report["classifier_feature_fid"], report["memorisation"]
    print(
        f"class fidelity (mean over classes): {fidelity['mean']:.1%}   "
        f"[classifier on held-out real images: {fidelity['classifier_heldout_accuracy']:.1%}]"
    )
    for name, accuracy in fidelity["per_class"].items():
        print(f"  {name:>16}: {accuracy:.1%}")
    print(
        f"classifier-feature FID (not Inception FID): {features['fid']:.2f}   "
        f"real-vs-real baseline: {features['fid_real_vs_real_baseline']:.2f}"
    )
    print(
        f"classifier-feature KID: {features['kid']:.4f} ± {features['kid_std']:.4f}   "
        f"baseline: {features['kid_real_vs_real_baseline']:.4f}"
    )
    inception = report["inception_fid"]
    print(
        f"Inception FID: {inception['fid']:.2f} (baseline {inception['fid_real_vs_real_baseline']:.2f})"
        if inception["available"]
        else f"Inception FID: unavailable — {inception['reason']}"
    )
    print(
        f"memorisation ratio (>1 = not copying): pixel {pixel['pixel']['ratio']:.2f}, "
        f"classifier features {pixel['classifier_features']['ratio']:.2f}"
    )
    if not report["heldout"]["clean_for_dit"]:
        print(
            "warning: held-out images come from the DiT's own data folder — pass --heldout-data for a clean "
            "memorisation and FID check"
        )


def report_label(path: Path) -> str:
    """A report's name in the summary: its folder (checkpoints/quality/glyphs/report.json -> glyphs)."""
    return path.parent.name or path.stem


def summarize_report(report: dict[str, Any], fidelity_bar: float) -> dict[str, Any]:
    """The headline figures of one report, and whether it meets the bar (fidelity and no copying)."""
    fidelity, features, copying = report["class_fidelity"], report["classifier_feature_fid"], report["memorisation"]
    worst = min(fidelity["per_class"], key=fidelity["per_class"].get)
    ratios = {"pixel": copying["pixel"]["ratio"], "classifier_features": copying["classifier_features"]["ratio"]}
    return {
        "dit": report["dit"],
        "dit_step": report["dit_step"],
        "num_classes": len(fidelity["per_class"]),
        "mean_class_fidelity": fidelity["mean"],
        "worst_class": worst,
        "worst_class_fidelity": fidelity["per_class"][worst],
        "classifier_heldout_accuracy": fidelity["classifier_heldout_accuracy"],
        "feature_fid": features["fid"],
        "feature_fid_real_vs_real_baseline": features["fid_real_vs_real_baseline"],
        "memorisation_ratio": ratios,
        "sampling_seconds": report["sampling"]["seconds"],
        "num_samples": features["num_samples"],
        "clean_for_dit": report["heldout"]["clean_for_dit"],
        "meets_bar": bool(
            fidelity["mean"] >= fidelity_bar and min(ratios.values()) > 1 and report["heldout"]["clean_for_dit"]
        ),
    }


def summarize(paths: list[str], fidelity_bar: float) -> dict[str, Any]:
    """{label: headline figures} of several reports, plus the bar they were judged by."""
    rows: dict[str, Any] = {}
    for path in map(Path, paths):
        try:
            report = json.loads(path.read_text())
            label = report_label(path)
            if label in rows:
                raise UserError(
                    f"two reports are named {label!r} (after their folder) — keep each data set's "
                    "report in its own folder"
                )
            rows[label] = {"report": str(path), **summarize_report(report, fidelity_bar)}
        except FileNotFoundError as error:
            raise UserError(f"--summarize {path}: no such report — run evaluate.py for that data set first") from error
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise UserError(f"--summarize {path} is not an evaluate.py report ({error!r})") from error
    return {
        "bar": {
            "mean_class_fidelity_at_least": fidelity_bar,
            "memorisation_ratio_above": 1.0,
            "heldout_unseen_by_dit": True,
        },
        "data_sets": rows,
        "all_meet_bar": all(row["meets_bar"] for row in rows.values()),
    }


def print_combined_summary(summary: dict[str, Any]) -> None:
    print(
        f"{'data set':<10} {'fidelity':>8}  {'worst class':<20} {'judge':>6}  {'feature FID (real-vs-real)':<27} "
        f"{'memorisation px/feat':<21} bar"
    )
    for label, row in summary["data_sets"].items():
        worst = f"{row['worst_class']} {row['worst_class_fidelity']:.0%}"
        fid_text = f"{row['feature_fid']:.1f} ({row['feature_fid_real_vs_real_baseline']:.1f})"
        ratios = f"{row['memorisation_ratio']['pixel']:.2f} / {row['memorisation_ratio']['classifier_features']:.2f}"
        print(
            f"{label:<10} {row['mean_class_fidelity']:>8.1%}  {worst:<20} {row['classifier_heldout_accuracy']:>6.1%}"
            f"  {fid_text:<27} {ratios:<21} {'met' if row['meets_bar'] else 'NOT MET'}"
        )
    bar = summary["bar"]
    print(
        f"bar: mean class fidelity >= {bar['mean_class_fidelity_at_least']:.0%}, memorisation ratios > 1, held-out "
        f"images unseen by the DiT — {'met by every data set' if summary['all_meet_bar'] else 'NOT met by all'}"
    )


# ====================================================================================================
# How good is a trained TinyDiT? Class fidelity, feature-space FID/KID and a memorisation check.
# ====================================================================================================


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
