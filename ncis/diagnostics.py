"""Outlier-pool diagnostics: do synthetic outliers actually leave their class?

Cheap, model-free measures written by `synthesize` for the outliers and for a control
pool generated from the class's own (unperturbed) embeddings with the same starting noise.
"""

from __future__ import annotations

import numpy as np
from scipy.spatial.distance import cdist, pdist
from sklearn.linear_model import LogisticRegression
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


def _flat(images: np.ndarray) -> np.ndarray:
    return images.reshape(len(images), -1).astype(np.float64)
