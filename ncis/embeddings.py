"""The embeddings `embed` and `sample` write, read and checked once for every stage that uses them."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ncis.errors import UserError
from ncis.io import load_arrays


def load_embeddings(path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    """`embeddings` float32 [N, D] and `labels` int64 [N], checked against the benchmark's classes."""
    arrays = load_arrays(path)
    missing = {"embeddings", "labels"} - arrays.keys()
    if missing:
        raise UserError(f"{path} lacks {sorted(missing)}; rerun `ncis embed`")
    embeddings = arrays["embeddings"].astype(np.float32)
    labels = arrays["labels"].astype(np.int64)
    if embeddings.ndim != 2 or labels.shape != (len(embeddings),):
        raise UserError(f"{path}: expected embeddings [N, D] and labels [N], got {embeddings.shape} and {labels.shape}")
    if labels.min() < 0 or labels.max() >= num_classes:
        raise UserError(f"{path}: labels outside [0, {num_classes}); were the embeddings made for another benchmark?")
    counts = np.bincount(labels, minlength=num_classes)
    if counts.min() < 2:
        short = int(np.argmin(counts))
        raise UserError(
            f"{path}: class {short} has {counts[short]} embedding(s), at least 2 are needed per class; "
            "embed more images (embed.image_limit=0 embeds all)"
        )
    return embeddings, labels


def load_outliers(path: Path, num_classes: int) -> np.ndarray:
    """`outliers` float32 [classes, pool, dim], checked against the benchmark's classes."""
    arrays = load_arrays(path)
    if "outliers" not in arrays:
        raise UserError(f"{path} lacks 'outliers'; rerun `ncis sample`")
    outliers = arrays["outliers"].astype(np.float32)
    if outliers.ndim != 3 or outliers.shape[1] == 0:
        raise UserError(f"{path}: expected outliers [classes, pool, dim], got {outliers.shape}; rerun `ncis sample`")
    if outliers.shape[0] != num_classes:
        raise UserError(
            f"{path} holds outliers for {outliers.shape[0]} classes, the benchmark has {num_classes}; were they sampled for "
            "another benchmark? rerun `ncis embed` and `ncis sample` for this one"
        )
    return outliers
