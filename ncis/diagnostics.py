"""Outlier-pool diagnostics: do synthetic outliers actually leave their class?

Cheap, model-free measures written by `synthesize` for the outliers and for a control
pool generated from the class's own (unperturbed) embeddings with the same starting noise.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist, pdist
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.preprocessing import StandardScaler
from sklearn.pipeline import make_pipeline


def fit_pixel_classifier(images: np.ndarray, labels: np.ndarray, seed: int = 0):
    """Logistic regression on flattened pixels of the ID training images (uint8 [N, H, W, C])."""
    model = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=seed))
    return model.fit(_flat(images), labels)


def in_class_fraction(classifier, images: np.ndarray, prompted: np.ndarray) -> float:
    """Fraction of images the ID classifier assigns to the class they were prompted with."""
    if len(images) == 0:
        return float("nan")
    return float(np.mean(classifier.predict(_flat(images)) == prompted))


def mahalanobis_ratio(id_embeddings: np.ndarray, id_labels: np.ndarray, outliers: np.ndarray, reg: float = 1e-5) -> float:
    """Mean Mahalanobis distance of outlier embeddings to their class / the same for the class's ID embeddings.

    `outliers` is [C, M, D]. Above 1 means the outliers lie outside the bulk of their class.
    """
    ratios = []
    for c in range(outliers.shape[0]):
        members = id_embeddings[id_labels == c]
        if len(members) < 2:
            continue
        mean = members.mean(0, keepdims=True)
        precision = np.linalg.inv(np.cov(members, rowvar=False) + reg * np.eye(members.shape[1]))

        def distance(x):
            return cdist(x, mean, "mahalanobis", VI=precision)[:, 0]

        ratios.append(distance(outliers[c]).mean() / distance(members).mean())
    return float(np.mean(ratios)) if ratios else float("nan")


def pairwise_diversity(images: np.ndarray, labels: np.ndarray) -> float:
    """Mean pairwise pixel L2 distance (images in [0, 1]) within each class, averaged over classes."""
    values = []
    for c in np.unique(labels):
        x = _flat(images[labels == c]) / 255.0
        if len(x) >= 2:
            values.append(pdist(x).mean())
    return float(np.mean(values)) if values else float("nan")


def statistics_shift(id_images: np.ndarray, images: np.ndarray) -> dict[str, float]:
    """How far a pool's global pixel statistics lie from the ID images' (both uint8 [N, H, W, C]).

    `mean_level_auroc`: how well the mean pixel level alone tells the pool from the ID images (0.5: not
    at all; above: the pool is brighter); `local_contrast_ratio`: the pool's mean local contrast over
    the ID images' (above 1: sharper). A pool that differs from the ID images in such a statistic
    hands the energy regulariser a shortcut that is no part of what makes it an outlier
    (docs/digits-study.md, "Blind spots").
    """
    if len(images) == 0 or len(id_images) == 0:
        return {"mean_level_auroc": float("nan"), "local_contrast_ratio": float("nan")}
    levels = np.concatenate([_flat(id_images).mean(1), _flat(images).mean(1)])
    is_pool = np.r_[np.zeros(len(id_images)), np.ones(len(images))]
    return {
        "mean_level_auroc": float(roc_auc_score(is_pool, levels)),
        "local_contrast_ratio": float(local_contrast(images).mean() / local_contrast(id_images).mean()),
    }


def local_contrast(images: np.ndarray) -> np.ndarray:
    """Per image [N, H, W, C]: the mean absolute difference between horizontally and vertically adjacent pixels."""
    images = np.asarray(images, np.float64)
    return (np.abs(np.diff(images, axis=2)).mean((1, 2, 3)) + np.abs(np.diff(images, axis=1)).mean((1, 2, 3))) / 2


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64)
