"""Pure metric functions for judging generated images: FID, KID, memorisation and class fidelity.

Everything works on plain feature matrices (N, D) (any feature space: classifier penultimate features,
Inception pool features or raw pixels) and is computed in float64 so that small differences survive.

- FID (Heusel et al. 2017): the Fréchet distance between Gaussians fitted to two sets,
  ||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^1/2). Tr (S1 S2)^1/2 is the sum of the square roots of the
  eigenvalues of S1^1/2 S2 S1^1/2, a symmetric PSD matrix, so two symmetric eigendecompositions replace
  scipy's general `sqrtm` (not installed here, and numerically worse).
- KID (Binkowski et al. 2018): the unbiased MMD^2 with the cubic polynomial kernel (x.y / d + 1)^3,
  averaged over random subsets. Unbiased means it is ~0 (and may be negative) for two samples of one
  distribution, so unlike FID it does not depend on the sample size.
- Memorisation: the distance from each generated image to its nearest TRAINING image, compared with
  the same distance for real images the model never saw. A generator that copies its training set puts
  samples closer to it than fresh real images are: ratio = median(sample NN) / median(held-out NN),
  so a ratio > 1 means "not copying" and a ratio near or below 1 is a warning sign.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

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
