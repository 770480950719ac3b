"""OOD scores of a trained classifier; higher always means "more in-distribution".

A scorer maps a batch of [0, 1] images to (logits, scores). The feature-space scores
(Mahalanobis, KNN) are first fitted on the ID training set, seen without augmentation.
"""

from __future__ import annotations

import numpy as np
import torch
from sklearn.covariance import EmpiricalCovariance
from sklearn.neighbors import NearestNeighbors
from torch.nn import functional as F
from torch.utils.data import DataLoader

from ncis import registry

def energy_score(logits: torch.Tensor) -> torch.Tensor:
    """Negative free energy, logsumexp of the logits (Liu et al. 2020)."""
    return torch.logsumexp(logits, dim=1)


def msp_score(logits: torch.Tensor) -> torch.Tensor:
    """Maximum softmax probability (Hendrycks & Gimpel 2017)."""
    return F.softmax(logits, dim=1).max(dim=1).values


def odin_score(model: torch.nn.Module, images: torch.Tensor, temperature: float, epsilon: float) -> torch.Tensor:
    """Temperature-scaled MSP after a small input step that raises it (Liang et al. 2018).

    The model normalises internally, so a step of `epsilon` on [0, 1] pixels equals the
    reference code's step of epsilon / std on normalised inputs.
    """
    with torch.enable_grad():
        images = images.detach().clone().requires_grad_(True)
        logits = model(images) / temperature
        loss = F.cross_entropy(logits, logits.argmax(dim=1))
        (grad,) = torch.autograd.grad(loss, images)
    perturbed = images.detach() - epsilon * grad.sign()
    with torch.no_grad():
        return msp_score(model(perturbed) / temperature)


@torch.no_grad()
def extract_features(model, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    features, labels = [], []
    for images, targets in loader:
        features.append(model.features(images.to(device)).float().cpu())
        labels.append(targets)
    return torch.cat(features).numpy(), torch.cat(labels).numpy()


class Scorer:
    needs_fit = False

    @classmethod
    def from_params(cls, evaluate_params) -> "Scorer":
        """Build from the `evaluate` section (each scorer reads its own keys)."""
        return cls()

    def fit(self, model, train_loader: DataLoader, device: torch.device) -> None:
        """Fit on the ID training set (no-op for output-based scores)."""

    def __call__(self, model, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        raise NotImplementedError


class EnergyScorer(Scorer):
    @torch.no_grad()
    def __call__(self, model, images):
        logits = model(images)
        return logits, energy_score(logits)


class MSPScorer(Scorer):
    @torch.no_grad()
    def __call__(self, model, images):
        logits = model(images)
        return logits, msp_score(logits)


class OdinScorer(Scorer):
    def __init__(self, temperature: float, epsilon: float):
        self.temperature, self.epsilon = temperature, epsilon

    @classmethod
    def from_params(cls, evaluate_params) -> "OdinScorer":
        return cls(evaluate_params.odin_temperature, evaluate_params.odin_epsilon)

    def __call__(self, model, images):
        with torch.no_grad():
            logits = model(images)
        return logits, odin_score(model, images, self.temperature, self.epsilon)


class MahalanobisScorer(Scorer):
    """Class-conditional Gaussians with one shared covariance on penultimate features (Lee et al. 2018).

    Plain version: last-layer features, no input preprocessing or layer ensemble.
    """

    needs_fit = True

    def fit(self, model, train_loader, device):
        features, labels = extract_features(model, train_loader, device)
        classes = np.unique(labels)
        means = np.stack([features[labels == c].mean(axis=0) for c in classes])
        centred = features - means[np.searchsorted(classes, labels)]
        precision = EmpiricalCovariance(assume_centered=True).fit(centred).precision_
        self.means = torch.as_tensor(means, dtype=torch.float32, device=device)
        self.precision = torch.as_tensor(precision, dtype=torch.float32, device=device)

    def distances(self, features: torch.Tensor) -> torch.Tensor:
        """Squared Mahalanobis distance of each sample to each class mean, [N, classes]."""
        diff = features[:, None, :] - self.means[None]
        return torch.einsum("ncd,de,nce->nc", diff, self.precision, diff)

    @torch.no_grad()
    def __call__(self, model, images):
        features = model.features(images)
        return model.fc(features), -self.distances(features.float()).min(dim=1).values


class KNNScorer(Scorer):
    """Negative distance to the k-th nearest L2-normalised training feature (Sun et al. 2022)."""

    needs_fit = True

    def __init__(self, k: int):
        self.k = k

    @classmethod
    def from_params(cls, evaluate_params) -> "KNNScorer":
        return cls(evaluate_params.knn_k)

    def fit(self, model, train_loader, device):
        features, _ = extract_features(model, train_loader, device)
        self.index = NearestNeighbors(n_neighbors=min(self.k, len(features))).fit(_normalise(features))

    @torch.no_grad()
    def __call__(self, model, images):
        features = model.features(images)
        distances, _ = self.index.kneighbors(_normalise(features.float().cpu().numpy()))
        return model.fc(features), torch.as_tensor(-distances[:, -1], dtype=torch.float32)


def _normalise(features: np.ndarray) -> np.ndarray:
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


def make_scorer(evaluate_params) -> Scorer:
    """The scorer ncis/registry.py names `evaluate.score`, built from the `evaluate` section."""
    return registry.resolve(registry.SCORES, evaluate_params.score, "evaluate.score").from_params(evaluate_params)


def score_loader(model, scorer: Scorer, loader: DataLoader, device: torch.device) -> dict[str, np.ndarray]:
    """Scores, logits and labels of every image in `loader` (model in eval mode)."""
    model.eval()
    scores, logits, labels = [], [], []
    for images, targets in loader:
        batch_logits, batch_scores = scorer(model, images.to(device))
        logits.append(batch_logits.detach().float().cpu())
        scores.append(batch_scores.detach().float().cpu())
        labels.append(targets)
    return {
        "scores": torch.cat(scores).numpy(),
        "logits": torch.cat(logits).numpy(),
        "labels": torch.cat(labels).numpy(),
    }
