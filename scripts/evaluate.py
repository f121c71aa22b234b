"""How good is a trained TinyDiT (the README's `make quality` says what each figure means): class fidelity judged by
the project's classifier, FID/KID in its feature space beside a real-vs-real baseline, Inception FID when its weights
are local, and a memorisation check; `--summarize` judges several reports against a bar."""

from __future__ import annotations

import json
import math
import pickle
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from tqdm import tqdm

from models.classifier import features_and_logits
from scripts.lib.checkpoints import classifier_normalize, load_classifier, load_dit
from scripts.lib.cli import DEVICES, UserError, cpu_threads_option, option, printable, resolve_device_type, run_main
from scripts.lib.cli import refuse, write_json
from scripts.lib.data import ImageCache, load_or_build_cache, stratified_split, to_unit_float
from scripts.lib.sampling import GRID_SUFFIXES, class_grid_labels, guidance_scale, resolve_sampler, sample_images
from scripts.lib.sampling import save_grid

KID_SUBSETS, KID_SUBSET_SIZE = 50, 1000  # the usual number and size of KID's subsets, when there are enough images
INCEPTION_SIZE = 299
GRID_COLUMNS = 8
FEATURE_FID_NOTE = (
    "classifier-feature FID: Fréchet distance in the project classifier's penultimate feature "
    "space, NOT Inception FID; compare it only with real_vs_real_baseline in this report"
)
MEMORISATION_NOTE = (
    "ratio = median distance to the nearest training image, of samples / of held-out real images; > 1: samples are "
    "no closer to the training images than unseen real images are (no copying); near or below 1: possible copying"
)


# Metrics: plain functions of (N, D) feature matrices
def gaussian_fit(features: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """(mean (D,), unbiased covariance (D, D)) of an (N, D) feature matrix."""
    array = np.asarray(features, np.float64)
    return array.mean(axis=0), np.cov(array, rowvar=False).reshape(array.shape[1], array.shape[1])


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    # tr sqrt(sigma1 sigma2) = tr sqrt(S sigma2 S) with S = sqrt(sigma1): a symmetric matrix, so eigh applies and
    # round-off cannot make the roots complex; its tiny negative eigenvalues are clipped to 0.
    values, vectors = np.linalg.eigh((sigma1 + sigma1.T) / 2)
    root1 = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
    middle = root1 @ sigma2 @ root1
    trace_sqrt_product = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0, None)).sum()
    value = (mu1 - mu2) @ (mu1 - mu2) + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product
    return float(max(value, 0.0))  # the true distance is >= 0; round-off can dip a hair below


def fid(features_a: np.ndarray | torch.Tensor, features_b: np.ndarray | torch.Tensor) -> float:
    """The formula of Inception FID, in whatever feature space."""
    return frechet_distance(*gaussian_fit(features_a), *gaussian_fit(features_b))


def mmd2_unbiased(a: np.ndarray, b: np.ndarray) -> float:
    """Unbiased MMD^2 with KID's cubic polynomial kernel, between two sets of >= 2 rows each."""
    k_aa, k_bb, k_ab = ((x @ y.T / a.shape[1] + 1.0) ** 3 for x, y in ((a, a), (b, b), (a, b)))
    within = [(k.sum() - np.trace(k)) / (len(k) * (len(k) - 1)) for k in (k_aa, k_bb)]  # unbiased: no self-pairs
    return float(sum(within) - 2 * k_ab.mean())


def kid(features_a, features_b, subset_size: int, num_subsets: int = KID_SUBSETS, seed: int = 0) -> tuple[float, float]:
    """(mean, std) of the unbiased MMD^2 of `num_subsets` random subsets of `subset_size` rows of each set."""
    a, b, rng = np.asarray(features_a, np.float64), np.asarray(features_b, np.float64), np.random.default_rng(seed)
    draws = ([x[rng.choice(len(x), subset_size, replace=False)] for x in (a, b)] for _ in range(num_subsets))
    values = [mmd2_unbiased(*subsets) for subsets in draws]
    return float(np.mean(values)), float(np.std(values))


def nearest_neighbour_distances(queries, references, chunk: int = 1024) -> np.ndarray:
    """(Q,) Euclidean distance from each query row to its nearest reference row (flatten images first)."""
    reference = torch.from_numpy(np.asarray(references, np.float64))  # no copy when already float64
    # Chunks bound the (chunk, R) distance matrix; float64 keeps small distances exact enough to compare.
    parts = torch.from_numpy(np.asarray(queries, np.float64)).split(chunk)
    return torch.cat([torch.cdist(part, reference).min(dim=1).values for part in parts]).numpy()


def memorisation(samples: np.ndarray, heldout: np.ndarray, train: np.ndarray) -> dict[str, float]:
    """Nearest-training-row distances of samples vs of held-out rows (ratio: see MEMORISATION_NOTE)."""
    train = np.asarray(train, np.float64)  # converted once for both comparisons (for pixels: every training image)
    sample_nn, heldout_nn = nearest_neighbour_distances(samples, train), nearest_neighbour_distances(heldout, train)
    sample_median, heldout_median = float(np.median(sample_nn)), float(np.median(heldout_nn))
    ratio = sample_median / heldout_median if heldout_median else (math.inf if sample_median > 0 else math.nan)
    return {"ratio": ratio, "sample_nn_median": sample_median, "heldout_nn_median": heldout_median,
            "sample_nn_min": float(sample_nn.min())}  # fmt: skip


def class_fidelity(predicted, requested, class_names: list[str]) -> dict[str, Any]:
    """How often the classifier sees a sample as the class it was generated for: per class (NaN for a class no
    sample asked for: not a zero in the mean), the mean over classes, and over all samples."""
    requested = np.asarray(requested)
    hits, counts = np.asarray(predicted) == requested, np.bincount(requested, minlength=len(class_names))
    with np.errstate(invalid="ignore", divide="ignore"):
        per_class = np.bincount(requested, weights=hits, minlength=len(class_names)) / counts
    by_name = dict(zip(class_names, per_class.tolist(), strict=True))
    return {"mean": float(per_class[counts > 0].mean()), "overall": float(hits.mean()), "per_class": by_name}


# Features: the judge classifier's, and torchvision's Inception-v3 from a local weights file only
@torch.no_grad()
def batched_outputs(forward, images_unit: torch.Tensor, size: int, batch_size: int, device, desc: str) -> list:
    """The float64 outputs of `forward` over unit-range images resized to size x size, batch by batch."""
    outputs = []
    for batch in tqdm(images_unit.split(batch_size), desc=desc, unit="batch", leave=False):
        batch = batch.to(device)
        if batch.shape[-1] != size:
            batch = F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
        outputs.append([output.cpu() for output in forward(batch)])
    return [torch.cat(parts).double().numpy() for parts in zip(*outputs, strict=True)]


def inception_weights_file() -> Path:  # in the torch hub cache ($TORCH_HOME), where torchvision keeps it
    from torchvision.models import Inception_V3_Weights

    return Path(torch.hub.get_dir()) / "checkpoints" / Path(Inception_V3_Weights.IMAGENET1K_V1.url).name


def load_inception(device: torch.device) -> nn.Module:
    """Inception-v3 returning 2048-d pool features, from the LOCAL weights file only (weights_only: the file cannot
    run code). transform_input=True, as torchvision builds it for these weights, turns the ImageNet-normalised input
    into the (x - 0.5) / 0.5 scaling the weights were trained on."""
    from torchvision.models import inception_v3

    model = inception_v3(weights=None, aux_logits=True, init_weights=False, transform_input=True)
    weights = inception_weights_file()
    try:
        model.load_state_dict(torch.load(weights, map_location="cpu", weights_only=True))
    except (OSError, EOFError, RuntimeError, pickle.UnpicklingError) as error:  # a truncated or foreign file
        why = f"{printable(weights)} is not torchvision's Inception-v3 weights ({type(error).__name__})"
        raise UserError(f"{why} — replace it with the real file or delete it") from error
    model.fc = nn.Identity()
    return model.to(device).eval()


def inception_report(samples, heldout, baseline, batch_size: int, device: torch.device, seed: int) -> dict[str, Any]:
    weights = inception_weights_file()
    if not weights.is_file():
        why = f"no torchvision Inception-v3 weights at {weights} (never downloaded)"
        return {"available": False, "reason": f"{why}: put them there, or set TORCH_HOME, to get Inception FID"}
    model = load_inception(device)
    forward = lambda batch: (model(classifier_normalize(batch)),)  # noqa: E731
    sets = (samples, heldout, baseline)
    features = [batched_outputs(forward, images, INCEPTION_SIZE, batch_size, device, "inception")[0] for images in sets]
    return {
        "available": True,
        "note": "torchvision Inception-v3 pool features (2048-d); close to, not identical with, the TF "
        f"Inception of published FIDs, and biased upward at {len(samples)} samples",
        **distance_report(*features, seed),
    }


# The report's sections, its JSON file and printout, and the --summarize table of several reports
def distance_report(sample_f: np.ndarray, heldout_f: np.ndarray, baseline_f: np.ndarray, seed: int) -> dict[str, Any]:
    """FID and KID of samples vs held-out, beside the same for real (training) images vs held-out."""
    # Subsets of half the smallest set: with subsets as big as the sets every draw is the same and kid_std reads 0.
    subset = max(2, min(KID_SUBSET_SIZE, min(len(sample_f), len(baseline_f), len(heldout_f)) // 2))
    kid_mean, kid_std = kid(sample_f, heldout_f, subset, seed=seed)
    baseline_mean, baseline_std = kid(baseline_f, heldout_f, subset, seed=seed)
    return {
        "fid": fid(sample_f, heldout_f), "fid_real_vs_real_baseline": fid(baseline_f, heldout_f),
        "kid": kid_mean, "kid_std": kid_std,
        "kid_real_vs_real_baseline": baseline_mean, "kid_real_vs_real_baseline_std": baseline_std,
        "kid_subset_size": subset, "kid_subsets": KID_SUBSETS,
        "num_samples": len(sample_f), "num_baseline_real": len(baseline_f), "num_heldout": len(heldout_f),
        "feature_dim": int(sample_f.shape[1]),
    }  # fmt: skip


def print_report(report: dict[str, Any]) -> None:
    fidelity, features, copying = report["class_fidelity"], report["classifier_feature_fid"], report["memorisation"]
    inception = report["inception_fid"]
    accuracy = fidelity["classifier_heldout_accuracy"]
    print(f"class fidelity (mean over classes): {fidelity['mean']:.1%}   [classifier on held-out real: {accuracy:.1%}]")
    for name, share in fidelity["per_class"].items():
        print(f"  {name:>16}: {share:.1%}")
    print(
        f"classifier-feature FID (not Inception FID): {features['fid']:.2f}   "
        f"real-vs-real baseline: {features['fid_real_vs_real_baseline']:.2f}\n"
        f"classifier-feature KID: {features['kid']:.4f} ± {features['kid_std']:.4f}   "
        f"baseline: {features['kid_real_vs_real_baseline']:.4f}"
    )
    if inception["available"]:
        print(f"Inception FID: {inception['fid']:.2f} (baseline {inception['fid_real_vs_real_baseline']:.2f})")
    else:
        print(f"Inception FID: unavailable — {inception['reason']}")
    print(
        f"memorisation ratio (>1 = not copying): pixel {copying['pixel']['ratio']:.2f}, "
        f"classifier features {copying['classifier_features']['ratio']:.2f}"
    )
    if not report["heldout"]["clean_for_dit"]:
        print("warning: held-out images come from the DiT's own data folder — pass --heldout-data for a clean check")


def summarize_report(report: dict[str, Any], fidelity_bar: float) -> dict[str, Any]:
    """The headline figures of one report, and whether it meets the bar (fidelity, no copying, clean held-out)."""
    fidelity, features, copying = report["class_fidelity"], report["classifier_feature_fid"], report["memorisation"]
    per_class, clean = fidelity["per_class"], report["heldout"]["clean_for_dit"]
    worst = min(per_class, key=per_class.get)
    ratios = {"pixel": copying["pixel"]["ratio"], "classifier_features": copying["classifier_features"]["ratio"]}
    return {
        "dit": report["dit"], "dit_step": report["dit_step"], "num_classes": len(per_class), "clean_for_dit": clean,
        "mean_class_fidelity": fidelity["mean"], "worst_class": worst, "worst_class_fidelity": per_class[worst],
        "classifier_heldout_accuracy": fidelity["classifier_heldout_accuracy"], "feature_fid": features["fid"],
        "feature_fid_real_vs_real_baseline": features["fid_real_vs_real_baseline"], "memorisation_ratio": ratios,
        "sampling_seconds": report["sampling"]["seconds"], "num_samples": features["num_samples"],
        "meets_bar": bool(fidelity["mean"] >= fidelity_bar and min(ratios.values()) > 1 and clean),
    }  # fmt: skip


def summarize(paths: list[str], fidelity_bar: float) -> dict[str, Any]:
    """{data set: headline figures} of several reports, each named after its folder, and the bar they were judged by."""
    rows: dict[str, Any] = {}
    for path in map(Path, paths):
        label = path.parent.name or path.stem  # checkpoints/quality/glyphs/report.json -> glyphs
        if label in rows:
            raise UserError(f"two reports are named {label!r} (after their folder) — keep each data set's in its own")
        try:
            rows[label] = {"report": str(path), **summarize_report(json.loads(path.read_text()), fidelity_bar)}
        except OSError as error:  # missing, a folder, unreadable
            raise UserError(f"--summarize {printable(path)}: {error.strerror} — pass an evaluate.py report") from error
        except (KeyError, TypeError, ValueError) as error:  # ValueError: not JSON, or no classes in it
            raise UserError(f"--summarize {printable(path)} is not an evaluate.py report ({error!r})") from error
    bar = {"mean_class_fidelity_at_least": fidelity_bar, "memorisation_ratio_above": 1.0, "heldout_unseen_by_dit": True}
    return {"bar": bar, "data_sets": rows, "all_meet_bar": all(row["meets_bar"] for row in rows.values())}


def print_summary(summary: dict[str, Any]) -> None:
    print("data set   fidelity  worst class           judge  feature FID (real-vs-real)  memorisation px/feat  bar")
    for label, row in summary["data_sets"].items():
        worst = f"{row['worst_class']} {row['worst_class_fidelity']:.0%}"
        fid_text = f"{row['feature_fid']:.1f} ({row['feature_fid_real_vs_real_baseline']:.1f})"
        ratios = f"{row['memorisation_ratio']['pixel']:.2f} / {row['memorisation_ratio']['classifier_features']:.2f}"
        print(
            f"{label:<10} {row['mean_class_fidelity']:>8.1%}  {worst:<20} {row['classifier_heldout_accuracy']:>6.1%}"
            f"  {fid_text:<27} {ratios:<21} {'met' if row['meets_bar'] else 'NOT MET'}"
        )
    verdict = "met by every data set" if summary["all_meet_bar"] else "NOT met by all"
    print(
        f"bar: mean class fidelity >= {summary['bar']['mean_class_fidelity_at_least']:.0%}, memorisation ratios > 1, "
        f"held-out images unseen by the DiT — {verdict}"
    )


# The command
@dataclass
class EvaluateConfig:
    dit: str = option("checkpoints/tinydit_final.safetensors", "TinyDiT weights file to evaluate")
    classifier: str = option("checkpoints/cats_model.safetensors", "the project's classifier weights file")
    data: str = option("data/cats", "image folder the DiT was trained on (the memorisation reference)")
    heldout_data: str = option("", "images neither model saw (default: the classifier's val split of --data; unclean)")
    num_per_class: int = option(50, "samples per class")
    cfg_scale: float | None = option(None, "classifier-free guidance scale (1 = none; default: the DiT's training one)")
    steps: int = option(50, "sampling steps")
    sampler: str | None = option(None, "sampler of the checkpoint's objective (default: the objective's default)")
    seed: int = option(0, "seed of the sampling noise and of the real subsets")
    out: str = option("", "JSON report path (default: <dit file>_eval.json beside the DiT file)")
    grid: str = option("", "PNG grid of samples, one row per class (default: <dit file>_eval_grid.png)")
    device: str = option("auto", "where to run", choices=DEVICES)
    batch_size: int = option(128, "images per classifier / feature batch")
    cache_dir: str = option("", "where the image caches go (default: DATA_DIR/.tiny-cats-cache, else ~/.cache)")
    cpu_threads: int = cpu_threads_option()
    summarize: list[str] = option([], "instead of evaluating: combine these reports into one summary, written to --out")
    fidelity_bar: float = option(0.9, "the mean class fidelity a data set must reach (the summary's verdict)")


def validate_config(cfg: EvaluateConfig) -> None:
    missing = "does not exist — train it first or pass the right path"
    unwritable_grid = bool(cfg.grid) and Path(cfg.grid).suffix.lower() not in GRID_SUFFIXES
    refuse({
        f"--dit {printable(cfg.dit)} {missing}": not Path(cfg.dit).is_file(),
        f"--classifier {printable(cfg.classifier)} {missing}": not Path(cfg.classifier).is_file(),
        f"--num-per-class must be >= 2 for FID/KID statistics (got {cfg.num_per_class})": cfg.num_per_class < 2,
        f"--steps must be positive (got {cfg.steps})": cfg.steps < 1,
        f"--batch-size must be positive (got {cfg.batch_size})": cfg.batch_size < 1,
        f"--cfg-scale must be >= 0 (got {cfg.cfg_scale})": cfg.cfg_scale is not None and cfg.cfg_scale < 0,
        f"--grid must end in {', '.join(GRID_SUFFIXES)}": unwritable_grid,
    })  # fmt: skip


@dataclass
class RealImages:  # unit-range images at the DiT's resolution
    train: torch.Tensor
    train_labels: np.ndarray
    heldout: torch.Tensor
    heldout_labels: np.ndarray
    heldout_source: str
    clean_for_dit: bool


def load_real_images(cfg: EvaluateConfig, image_size: int, class_names: list[str], classifier_config) -> RealImages:
    """Training reference = all of --data (what the DiT saw); held-out from --heldout-data or the val split."""

    def cached(folder: str, flag: str) -> ImageCache:
        cache = load_or_build_cache(folder, image_size, cache_dir=cfg.cache_dir or None)
        if list(cache.class_names) != list(class_names):
            raise UserError(
                f"{flag} {printable(folder)} has classes {printable(cache.class_names)} but the checkpoints know "
                f"{printable(class_names)} — evaluate on a folder with the same class subfolders"
            )
        return cache

    def unit(cache: ImageCache, indices: np.ndarray) -> tuple[torch.Tensor, np.ndarray]:
        return to_unit_float(torch.from_numpy(np.ascontiguousarray(cache.images[indices]))), cache.labels[indices]

    cache = cached(cfg.data, "--data")
    if cfg.heldout_data:
        heldout = cached(cfg.heldout_data, "--heldout-data")
        both = unit(cache, np.arange(len(cache))) + unit(heldout, np.arange(len(heldout)))
        return RealImages(*both, f"folder {cfg.heldout_data}", clean_for_dit=True)
    val_fraction = float(classifier_config.get("val_split") or 0.0)
    if val_fraction <= 0:
        raise UserError("the classifier checkpoint has no validation split to hold out — pass --heldout-data DIR")
    # The split the classifier trainer drew, so the held-out images were never trained on by it.
    train_idx, val_idx = stratified_split(cache.labels, val_fraction, int(classifier_config.get("seed", 0)))
    source = f"classifier validation split of {cfg.data} (fraction {val_fraction})"
    return RealImages(*unit(cache, train_idx), *unit(cache, val_idx), source, clean_for_dit=False)


def balanced_subset(labels: np.ndarray, per_class: int, num_classes: int, seed: int) -> np.ndarray:
    """Up to `per_class` random indices of each class, so the baseline has the samples' class mix."""
    permutation = np.random.default_rng(seed).permutation
    return np.sort(np.concatenate([permutation(np.flatnonzero(labels == c))[:per_class] for c in range(num_classes)]))


def main(cfg: EvaluateConfig) -> dict[str, Any]:
    if cfg.summarize:
        if not cfg.out:
            raise UserError("--summarize needs --out, the path of the summary JSON")
        if not 0 <= cfg.fidelity_bar <= 1:
            raise UserError(f"--fidelity-bar is a fraction in [0, 1] (got {cfg.fidelity_bar})")
        summary = summarize(cfg.summarize, cfg.fidelity_bar)
        write_json(Path(cfg.out), summary, "the summary")
        print_summary(summary)
        print(f"summary -> {cfg.out}")
        return summary
    validate_config(cfg)
    started = time.perf_counter()
    device = torch.device(resolve_device_type(cfg.device))
    dit, objective, meta = load_dit(cfg.dit, device=device)
    classifier, classifier_meta = load_classifier(cfg.classifier, device=device)
    class_names = list(meta["class_names"])
    if list(classifier_meta["class_names"]) != class_names:
        raise UserError(
            f"the DiT knows classes {printable(class_names)} but the classifier "
            f"{printable(classifier_meta['class_names'])} — evaluate with a classifier trained on the same classes"
        )
    sampler, cfg_scale = resolve_sampler(objective, cfg.sampler), guidance_scale(cfg.cfg_scale, meta)
    real = load_real_images(cfg, meta["image_size"], class_names, classifier_meta.get("config", {}))

    labels = class_grid_labels(list(range(len(class_names))), cfg.num_per_class, device)
    sampling_started = time.perf_counter()
    samples = sample_images(
        dit, objective, labels, steps=cfg.steps, cfg_scale=cfg_scale, sampler=sampler, seed=cfg.seed,
        progress=f"sampling {len(labels)} images",
    ).cpu()  # fmt: skip
    sampling_seconds = time.perf_counter() - sampling_started
    dit_path = Path(cfg.dit)
    grid = Path(cfg.grid) if cfg.grid else dit_path.with_name(dit_path.stem + "_eval_grid.png")
    columns = min(GRID_COLUMNS, cfg.num_per_class)
    save_grid(samples.unflatten(0, (len(class_names), -1))[:, :columns].flatten(0, 1), grid, per_row=columns)

    def classify(images: torch.Tensor, desc: str) -> tuple[np.ndarray, np.ndarray]:  # (predictions, features)
        judge = lambda batch: features_and_logits(classifier, classifier_normalize(batch, classifier_meta))  # noqa: E731
        features, logits = batched_outputs(judge, images, classifier_meta["image_size"], cfg.batch_size, device, desc)
        return logits.argmax(axis=1), features

    sample_pred, sample_f = classify(samples, "classify samples")
    heldout_pred, heldout_f = classify(real.heldout, "classify held-out")
    train_f = classify(real.train, "training features")[1]
    baseline_idx = balanced_subset(real.train_labels, cfg.num_per_class, len(class_names), cfg.seed)
    report = {
        "dit": cfg.dit, "classifier": cfg.classifier, "data": cfg.data, "grid": str(grid),
        "dit_step": meta.get("step"), "dit_model": meta.get("model"), "image_size": meta["image_size"],
        "classifier_backbone": classifier_meta.get("backbone"), "classifier_image_size": classifier_meta["image_size"],
        "sampling": {
            "num_per_class": cfg.num_per_class, "cfg_scale": cfg_scale, "steps": cfg.steps, "sampler": sampler,
            "seed": cfg.seed, "seconds": sampling_seconds, "images_per_second": len(samples) / sampling_seconds,
        },
        "heldout": {
            "source": real.heldout_source, "count": len(real.heldout), "clean_for_dit": real.clean_for_dit,
            "training_reference_count": len(real.train),
        },
        "class_fidelity": {
            **class_fidelity(sample_pred, labels.cpu(), class_names),
            "classifier_heldout_accuracy": float((heldout_pred == real.heldout_labels).mean()),
        },
        "classifier_feature_fid": {
            "note": FEATURE_FID_NOTE, **distance_report(sample_f, heldout_f, train_f[baseline_idx], cfg.seed),
        },
        "inception_fid": inception_report(
            samples, real.heldout, real.train[baseline_idx], cfg.batch_size, device, cfg.seed
        ),
        "memorisation": {
            "note": MEMORISATION_NOTE,
            "pixel": memorisation(*(images.flatten(1) for images in (samples, real.heldout, real.train))),
            "classifier_features": memorisation(sample_f, heldout_f, train_f),
        },
        "seconds": time.perf_counter() - started,  # last: the values above are computed in order
    }  # fmt: skip
    out = Path(cfg.out) if cfg.out else dit_path.with_name(dit_path.stem + "_eval.json")
    write_json(out, report, "the report")
    print_report(report)
    print(f"report -> {out}   grid -> {grid}   ({report['seconds']:.0f}s)")
    return report


if __name__ == "__main__":
    run_main(
        main,
        EvaluateConfig,
        "Evaluate a TinyDiT: class fidelity, classifier-feature FID/KID vs a real-vs-real baseline, Inception FID "
        "when its weights are local, and a memorisation check; or --summarize several reports.",
    )
