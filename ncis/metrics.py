"""OOD detection metrics. ID is the positive class; a higher score means "more ID".

All metrics are fractions in [0, 1].
"""

from __future__ import annotations

import math
from typing import Iterable

import numpy as np
from sklearn.metrics import average_precision_score, roc_auc_score

METRIC_NAMES = ("fpr95", "auroc", "aupr_in", "aupr_out")


def checked_scores(id_scores, ood_scores) -> tuple[np.ndarray, np.ndarray]:
    id_scores = np.asarray(id_scores, dtype=np.float64).ravel()
    ood_scores = np.asarray(ood_scores, dtype=np.float64).ravel()
    if id_scores.size == 0 or ood_scores.size == 0:
        raise ValueError("OOD metrics need at least one ID and one OOD score")
    if not (np.isfinite(id_scores).all() and np.isfinite(ood_scores).all()):
        raise ValueError("OOD metrics got non-finite scores (NaN or inf)")
    return id_scores, ood_scores


def _labels_and_scores(id_scores: np.ndarray, ood_scores: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    labels = np.concatenate([np.ones(id_scores.size), np.zeros(ood_scores.size)])
    return labels, np.concatenate([id_scores, ood_scores])


def fpr_at_tpr(id_scores, ood_scores, tpr: float = 0.95) -> float:
    """Fraction of OOD samples accepted at the threshold that keeps at least `tpr` of the ID samples.

    A sample is accepted when its score is >= the threshold. The threshold is the highest
    value that accepts at least ceil(tpr * n_id) ID samples, i.e. that ID sample's score.
    Ties are resolved conservatively: ID samples tied with the threshold are all accepted
    (TPR may exceed `tpr`) and OOD samples tied with it count as false positives.
    """
    if not 0 < tpr <= 1:
        raise ValueError(f"tpr must be in (0, 1], got {tpr}")
    id_scores, ood_scores = checked_scores(id_scores, ood_scores)
    # The small tolerance keeps 0.95 * 20 = 19 (not 20) under floating-point error.
    needed = max(1, math.ceil(tpr * id_scores.size - 1e-9))
    threshold = np.sort(id_scores)[::-1][needed - 1]
    return float(np.mean(ood_scores >= threshold))


def auroc(id_scores, ood_scores) -> float:
    labels, scores = _labels_and_scores(*checked_scores(id_scores, ood_scores))
    return float(roc_auc_score(labels, scores))


def aupr_in(id_scores, ood_scores) -> float:
    """Average precision with ID as the positive class."""
    labels, scores = _labels_and_scores(*checked_scores(id_scores, ood_scores))
    return float(average_precision_score(labels, scores))


def aupr_out(id_scores, ood_scores) -> float:
    """Average precision with OOD as the positive class (scores negated: lower = more OOD)."""
    labels, scores = _labels_and_scores(*checked_scores(id_scores, ood_scores))
    return float(average_precision_score(1 - labels, -scores))


def ood_metrics(id_scores, ood_scores) -> dict[str, float]:
    return {
        "fpr95": fpr_at_tpr(id_scores, ood_scores, 0.95),
        "auroc": auroc(id_scores, ood_scores),
        "aupr_in": aupr_in(id_scores, ood_scores),
        "aupr_out": aupr_out(id_scores, ood_scores),
    }


def average(results: Iterable[dict[str, float]]) -> dict[str, float]:
    """Unweighted mean of each metric over OOD sets (every set counts once, whatever its size)."""
    results = list(results)
    if not results:
        raise ValueError("nothing to average")
    return {name: float(np.mean([r[name] for r in results])) for name in METRIC_NAMES}


def accuracy(logits, labels) -> float:
    predictions = np.asarray(logits).argmax(axis=1)
    labels = np.asarray(labels)
    if labels.size == 0:
        raise ValueError("accuracy of an empty set")
    return float(np.mean(predictions == labels))
