"""Metric functions against closed forms and hand counts."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from scripts.evaluate import (
    class_fidelity,
    fid,
    frechet_distance,
    gaussian_fit,
    kid,
    memorisation_ratio,
    mmd2_unbiased,
    nearest_neighbour_distances,
)


def test_fid_of_identical_sets_is_zero():
    features = np.random.default_rng(0).normal(size=(200, 16))
    assert fid(features, features) == pytest.approx(0.0, abs=1e-8)
    assert fid(torch.from_numpy(features).float(), features) == pytest.approx(0.0, abs=1e-4)


def test_frechet_distance_isotropic_closed_form():
    d, s1, s2 = 8, 0.5, 2.0
    mu1, mu2 = np.zeros(d), np.full(d, 0.3)
    expected = d * 0.3**2 + d * (s1 - s2) ** 2  # ||mu1-mu2||^2 + d (std1 - std2)^2
    got = frechet_distance(mu1, s1**2 * np.eye(d), mu2, s2**2 * np.eye(d))
    assert got == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_non_commuting_covariances_2d():
    # For a 2x2 matrix with positive eigenvalues, tr sqrt(A) = sqrt(tr A + 2 sqrt(det A)): an independent check.
    s1 = np.array([[2.0, 0.8], [0.8, 1.0]])
    s2 = np.array([[1.0, -0.4], [-0.4, 3.0]])
    mu1, mu2 = np.array([1.0, -1.0]), np.array([0.5, 2.0])
    product = s1 @ s2
    trace_sqrt = math.sqrt(np.trace(product) + 2 * math.sqrt(np.linalg.det(product)))
    expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt
    assert frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-10)


def test_fid_of_sampled_shifted_gaussians_matches_closed_form():
    rng = np.random.default_rng(1)
    d, n, shift, s1, s2 = 4, 20000, 1.5, 1.0, 1.5
    a = rng.normal(scale=s1, size=(n, d))
    b = rng.normal(scale=s2, size=(n, d)) + shift / math.sqrt(d)  # total mean shift has norm `shift`
    expected = shift**2 + d * (s1 - s2) ** 2
    assert fid(a, b) == pytest.approx(expected, rel=0.05)


def test_gaussian_fit_uses_unbiased_covariance():
    features = np.array([[0.0, 0.0], [2.0, 0.0]])
    mean, cov = gaussian_fit(features)
    np.testing.assert_allclose(mean, [1.0, 0.0])
    np.testing.assert_allclose(cov, [[2.0, 0.0], [0.0, 0.0]])


def test_mmd2_unbiased_matches_hand_computation():
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=(4, 3)), rng.normal(size=(5, 3))

    def k(x, y):
        return (x @ y / 3 + 1) ** 3

    within_a = sum(k(a[i], a[j]) for i in range(4) for j in range(4) if i != j) / 12
    within_b = sum(k(b[i], b[j]) for i in range(5) for j in range(5) if i != j) / 20
    cross = sum(k(x, y) for x in a for y in b) / 20
    assert mmd2_unbiased(a, b) == pytest.approx(within_a + within_b - 2 * cross, rel=1e-12)


def test_kid_is_unbiased_for_one_distribution_and_large_for_two():
    rng = np.random.default_rng(3)
    trials = [mmd2_unbiased(rng.normal(size=(10, 4)), rng.normal(size=(10, 4))) for _ in range(400)]
    biased = []
    for _ in range(400):  # the V-statistic (diagonal kept) is positive on average: what "unbiased" removes
        x, y = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
        kxx, kyy, kxy = ((x @ x.T / 4 + 1) ** 3, (y @ y.T / 4 + 1) ** 3, (x @ y.T / 4 + 1) ** 3)
        biased.append(kxx.mean() + kyy.mean() - 2 * kxy.mean())
    assert min(trials) < 0  # an unbiased estimate of 0 must sometimes be negative
    assert abs(np.mean(trials)) < 0.1 * np.mean(biased)

    same = kid(rng.normal(size=(300, 8)), rng.normal(size=(300, 8)), num_subsets=20, subset_size=100)
    shifted = kid(rng.normal(size=(300, 8)), rng.normal(size=(300, 8)) + 1.0, num_subsets=20, subset_size=100)
    assert same.subset_size == 100 and same.num_subsets == 20
    assert abs(same.mean) < 3 * same.std + 1e-3
    assert shifted.mean > 20 * abs(same.mean) + 10 * same.std


def test_kid_caps_subset_size_at_smaller_set():
    rng = np.random.default_rng(4)
    result = kid(rng.normal(size=(30, 2)), rng.normal(size=(50, 2)), num_subsets=3, subset_size=1000)
    assert result.subset_size == 30


def test_nearest_neighbour_distances():
    references = np.array([[0.0, 0.0], [10.0, 0.0]])
    queries = np.array([[1.0, 0.0], [10.0, 3.0], [4.0, 3.0]])
    np.testing.assert_allclose(nearest_neighbour_distances(queries, references, chunk=2), [1.0, 3.0, 5.0])


def test_memorisation_ratio_flags_copies():
    rng = np.random.default_rng(5)
    train = rng.normal(size=(200, 10))
    heldout = rng.normal(size=(50, 10))
    copies = train[:50] + 1e-3 * rng.normal(size=(50, 10))
    heldout_nn = nearest_neighbour_distances(heldout, train)
    copying = memorisation_ratio(nearest_neighbour_distances(copies, train), heldout_nn)
    fresh = memorisation_ratio(nearest_neighbour_distances(rng.normal(size=(50, 10)), train), heldout_nn)
    assert copying < 0.01
    assert 0.7 < fresh < 1.4


def test_class_fidelity_counts_per_class():
    requested = [0, 0, 0, 0, 1, 1, 2, 2]
    predicted = [0, 0, 1, 0, 1, 0, 2, 2]
    result = class_fidelity(predicted, requested, num_classes=4)
    assert result.counts == [4, 2, 2, 0]
    assert result.per_class[:3] == [0.75, 0.5, 1.0]
    assert math.isnan(result.per_class[3])
    assert result.mean == pytest.approx((0.75 + 0.5 + 1.0) / 3)
    assert result.overall == pytest.approx(6 / 8)


def test_class_fidelity_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        class_fidelity([0, 1], [0], num_classes=2)
