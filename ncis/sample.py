"""Stage sample: per class, draw candidate embeddings and keep the most outlying ones.

- `cvpn` (NCIS): fit a Gaussian to the class's embeddings in the cVPN's output space, keep the
  lowest-density draws and map them back with the inverse for that class. The cVPN is
  volume-preserving, so low density there is low density of the embeddings.
- `linear`: the same selection in the raw embedding space (no cVPN).
- `knn` (Dream-OOD style): jitter the class's boundary embeddings (largest k-th neighbour
  distance) and keep the draws farthest from the class.

Every method scores candidates so that lower = more outlying: the log-density, or minus the
k-th neighbour distance. Output: `outliers` [C, rounds*keep, D] in class-index order.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch.distributions import MultivariateNormal

from ncis import tracking
from ncis.config import Params, SampleParams
from ncis.cvpn import CVPN, load_cvpn
from ncis.datasets import get_benchmark
from ncis.embeddings import load_embeddings
from ncis.errors import UserError
from ncis.io import save_arrays
from ncis.layout import layout_for
from ncis.runtime import resolve_device, seed_everything, single_cpu_thread


@dataclass
class Selection:
    kept: torch.Tensor  # [rounds * keep, D], in the space the candidates were drawn in
    kept_scores: torch.Tensor  # [rounds, keep]; lower = more outlying
    discarded_scores: torch.Tensor  # [rounds, candidates - keep]


def keep_lowest(draws: list[torch.Tensor], scores: list[torch.Tensor], keep: int) -> Selection:
    """Per round, keep the `keep` draws with the lowest score."""
    kept, kept_scores, discarded_scores = [], [], []
    for round_draws, round_scores in zip(draws, scores):
        order = round_scores.argsort()
        kept.append(round_draws[order[:keep]])
        kept_scores.append(round_scores[order[:keep]])
        discarded_scores.append(round_scores[order[keep:]])
    return Selection(torch.cat(kept), torch.stack(kept_scores), torch.stack(discarded_scores))


def gaussian_low_density(
    points: torch.Tensor, *, candidates: int, keep: int, rounds: int, reg: float, generator: torch.Generator
) -> Selection:
    """Fit N(mean, cov + reg·I) to `points`; per round draw `candidates`, keep the `keep` least likely."""
    points = points.detach().cpu().double()  # float64: invariant directions have tiny variances
    mean = points.mean(0)
    covariance = torch.cov(points.T).reshape(len(mean), len(mean)) + reg * torch.eye(len(mean), dtype=points.dtype)
    scale, info = torch.linalg.cholesky_ex(covariance)
    if info.item():
        raise UserError("a class covariance is not positive definite; raise sample.reg (e.g. --set sample.reg=1e-4)")
    gaussian = MultivariateNormal(mean, scale_tril=scale)
    # Drawn by hand from the Cholesky factor: MultivariateNormal.sample takes no generator.
    draws = [mean + torch.randn(candidates, len(mean), generator=generator, dtype=points.dtype) @ scale.T for _ in range(rounds)]
    return keep_lowest(draws, [gaussian.log_prob(d) for d in draws], keep)


def knn_boundary_outliers(
    points: torch.Tensor,
    *,
    candidates: int,
    keep: int,
    rounds: int,
    k: int,
    noise: float,
    boundary: int,
    generator: torch.Generator,
) -> Selection:
    """Dream-OOD style: Gaussian jitter around boundary points; keep the draws farthest (k-th neighbour) from the class."""
    points = points.detach().cpu().double()
    k = min(k, len(points) - 1)

    def kth_neighbour_distance(queries: torch.Tensor, skip_self: bool) -> torch.Tensor:
        return torch.cdist(queries, points).kthvalue(k + int(skip_self), dim=1).values

    edge = points[kth_neighbour_distance(points, skip_self=True).topk(min(boundary, len(points))).indices]
    spread = noise * points.std(0)
    draws = []
    for _ in range(rounds):
        centres = edge[torch.randint(len(edge), (candidates,), generator=generator)]
        draws.append(centres + spread * torch.randn(centres.shape, generator=generator, dtype=points.dtype))
    return keep_lowest(draws, [-kth_neighbour_distance(d, skip_self=False) for d in draws], keep)


@torch.no_grad()
def sample_outliers(
    embeddings: np.ndarray,
    labels: np.ndarray,
    num_classes: int,
    settings: SampleParams,
    *,
    generator: torch.Generator,
    model: CVPN | None = None,
    device: torch.device | str = "cpu",
) -> dict[str, np.ndarray]:
    """`outliers` [C, rounds*keep, D], `scores` [C, rounds*keep] (lower = more outlying), `labels` [C]."""
    if settings.method == "cvpn" and model is None:
        raise ValueError("method 'cvpn' needs the trained cVPN")
    device = torch.device(device)
    with single_cpu_thread(device):
        per_class = [
            _sample_class(torch.as_tensor(embeddings[labels == c]), c, settings, generator, model, device)
            for c in range(num_classes)
        ]
    return {
        "outliers": torch.stack([kept for kept, _ in per_class]).numpy(),
        "scores": torch.stack([scores for _, scores in per_class]).numpy(),
        "labels": np.arange(num_classes, dtype=np.int64),
        "method": np.array(settings.method),  # a plain unicode array: loads without pickle
    }


def _sample_class(points, c, settings, generator, model, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept outlier embeddings [rounds*keep, D], their scores [rounds*keep]) for class `c`."""
    if settings.method == "knn":
        selection = knn_boundary_outliers(
            points,
            candidates=settings.candidates,
            keep=settings.keep,
            rounds=settings.rounds,
            k=settings.knn_k,
            noise=settings.knn_noise,
            boundary=settings.knn_boundary,
            generator=generator,
        )
        kept = selection.kept
    else:
        space = points if settings.method == "linear" else model(points.to(device), c)
        selection = gaussian_low_density(
            space, candidates=settings.candidates, keep=settings.keep, rounds=settings.rounds, reg=settings.reg, generator=generator
        )
        kept = selection.kept if settings.method == "linear" else model.inverse(selection.kept.float().to(device), c)
    return kept.float().cpu(), selection.kept_scores.flatten().float()


def _load_cvpn_for(folder, dim: int, num_classes: int) -> CVPN:
    if not (folder / "config.json").exists():
        raise UserError(f"{folder} is missing; run `ncis train-cvpn` first (or --set sample.method=linear|knn)")
    model = load_cvpn(folder)
    if (model.dim, model.num_classes) != (dim, num_classes):
        raise UserError(
            f"{folder} was trained on {model.num_classes} classes of dimension {model.dim}, but the embeddings "
            f"have {num_classes} classes of dimension {dim}; rerun `ncis train-cvpn`"
        )
    return model


def main(params: Params) -> dict[str, np.ndarray]:
    layout = layout_for(params)
    generator = seed_everything(params.seed)
    device = resolve_device(params.device)
    num_classes = get_benchmark(params.benchmark).num_classes
    embeddings, labels = load_embeddings(layout.embeddings, num_classes)
    model = None
    if params.sample.method == "cvpn":
        model = _load_cvpn_for(layout.cvpn, embeddings.shape[1], num_classes).to(device)

    arrays = sample_outliers(embeddings, labels, num_classes, params.sample, generator=generator, model=model, device=device)
    save_arrays(layout.outliers, **arrays)
    tracking.log_metrics({"mean_kept_score": float(arrays["scores"].mean())})
    tracking.log_artifact(layout.outliers)
    return arrays
