"""Outlier-pool diagnostics written by `synthesize`."""

from __future__ import annotations

import numpy as np

from ncis.datasets.digits import split_digits
from ncis.diagnostics import fit_pixel_classifier, in_class_fraction, local_contrast, mahalanobis_ratio, pairwise_diversity, statistics_shift


def test_in_class_fraction_is_high_for_real_digits_and_low_for_noise():
    (train_x, train_y), (test_x, test_y) = split_digits(0.25, seed=0)
    classifier = fit_pixel_classifier(train_x, train_y)
    assert in_class_fraction(classifier, test_x, test_y) > 0.9
    noise = np.random.default_rng(0).integers(0, 256, test_x.shape, dtype=np.uint8)
    assert in_class_fraction(classifier, noise, test_y) < 0.3


def test_mahalanobis_ratio_is_one_inside_the_class_and_large_outside():
    rng = np.random.default_rng(0)
    members = rng.normal(size=(400, 3))
    labels = np.zeros(400, int)
    inside = rng.normal(size=(1, 200, 3))
    assert 0.9 < mahalanobis_ratio(members, labels, inside) < 1.1
    assert mahalanobis_ratio(members, labels, inside * 5) > 4


def test_pairwise_diversity_is_zero_for_copies_and_grows_with_spread():
    image = np.full((5, 4, 4, 1), 100, np.uint8)
    labels = np.zeros(5, int)
    assert pairwise_diversity(image, labels) == 0
    spread = np.random.default_rng(0).integers(0, 256, (5, 4, 4, 1), dtype=np.uint8)
    assert pairwise_diversity(spread, labels) > 1


def test_mahalanobis_ratio_equals_a_direct_computation():
    rng = np.random.default_rng(1)
    members = rng.normal(size=(50, 3)) * [1.0, 2.0, 0.5]
    outliers = rng.normal(size=(1, 7, 3)) * 3
    mean, precision = members.mean(0), np.linalg.inv(np.cov(members, rowvar=False) + 1e-5 * np.eye(3))
    distance = lambda x: np.sqrt(np.einsum("nd,de,ne->n", x - mean, precision, x - mean))  # noqa: E731
    expected = distance(outliers[0]).mean() / distance(members).mean()
    assert np.isclose(mahalanobis_ratio(members, np.zeros(50, int), outliers), expected)


def test_pairwise_diversity_is_the_mean_pixel_distance_within_each_class():
    images = np.zeros((4, 1, 2, 1), np.uint8)
    images[1, 0, 0, 0] = images[3, 0, 1, 0] = 255  # class 0: distance 1; class 1: distance sqrt(2)
    images[2, 0, 0, 0] = 255
    labels = np.array([0, 0, 1, 1])
    assert np.isclose(pairwise_diversity(images, labels), (1.0 + np.sqrt(2)) / 2)


def test_statistics_shift_sees_a_brighter_or_sharper_pool_and_not_a_resample():
    (train_x, _), (test_x, _) = split_digits(0.25, seed=0)
    same = statistics_shift(train_x, test_x)  # unseen digits: the same statistics
    assert 0.4 < same["mean_level_auroc"] < 0.6 and 0.9 < same["local_contrast_ratio"] < 1.1
    inked = np.minimum(test_x.astype(np.int64) * 5 // 4, 255).astype(np.uint8)  # a quarter more ink
    assert statistics_shift(train_x, inked)["mean_level_auroc"] > 0.7
    assert statistics_shift(train_x, 255 - test_x)["mean_level_auroc"] > 0.99  # negatives
    # Sharper: every pixel pushed to black or white, the same mean level within a little.
    assert statistics_shift(train_x, np.where(test_x > 127, 255, 0).astype(np.uint8))["local_contrast_ratio"] > 1.05


def test_local_contrast_is_the_mean_step_between_neighbours():
    image = np.zeros((1, 4, 4, 1), np.uint8)
    image[0, :, 2:] = 100  # one vertical edge: 1 of 3 horizontal steps per row is 100, no vertical step
    assert local_contrast(image)[0] == (100 / 3 + 0) / 2
