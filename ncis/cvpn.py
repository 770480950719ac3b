"""Conditional volume-preserving network (cVPN) and the PCA rule that sets its number of invariants.

The network is a stack of learned rotations and class-conditional additive couplings:
both have |det J| = 1 and an exact inverse, so densities in its output space are densities
of the embeddings, and low-density points there map back to embeddings of that class.
Its last `num_invariants` outputs are trained to be ~0 on a class's embeddings.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from sklearn.decomposition import PCA
from torch import nn

from ncis.io import load_state, load_weights


# The config keys that rebuild a CVPN (the constructor's arguments, less the mean held in the weights).
ARCHITECTURE_KEYS = ("dim", "num_classes", "coupling_layers", "hidden", "class_embedding", "num_invariants")


class Orthogonal(nn.Module):
    """x -> exp(A - Aᵀ) x + b: exp of a skew-symmetric matrix is a rotation, so |det| = 1."""

    def __init__(self, dim: int):
        super().__init__()
        # A random (not identity) start mixes the halves the next coupling splits.
        self.generator = nn.Parameter(torch.randn(dim, dim) / dim**0.5)
        self.bias = nn.Parameter(torch.zeros(dim))

    def matrix(self) -> torch.Tensor:
        return torch.linalg.matrix_exp(self.generator - self.generator.T)

    # `matrix` may be passed in so one pass that goes forward and back computes it once.
    def forward(self, x: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
        return x @ (self.matrix() if matrix is None else matrix).T + self.bias

    def inverse(self, z: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
        return (z - self.bias) @ (self.matrix() if matrix is None else matrix)


class AdditiveCoupling(nn.Module):
    """First half += MLP(second half, class embedding): a shear, so |det| = 1 and the inverse subtracts."""

    def __init__(self, dim: int, class_embedding: int, hidden: int):
        super().__init__()
        self.split = dim // 2
        self.shift = nn.Sequential(
            nn.Linear(dim - self.split + class_embedding, hidden),
            nn.SiLU(),
            nn.Linear(hidden, hidden),
            nn.SiLU(),
            nn.Linear(hidden, self.split),
        )
        # Start as the identity so the untrained network is a plain rotation.
        nn.init.zeros_(self.shift[-1].weight)
        nn.init.zeros_(self.shift[-1].bias)

    def _shift(self, rest: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.shift(torch.cat([rest, condition], dim=-1))

    def forward(self, x: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        head, rest = x[..., : self.split], x[..., self.split :]
        return torch.cat([head + self._shift(rest, condition), rest], dim=-1)

    def inverse(self, z: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        head, rest = z[..., : self.split], z[..., self.split :]
        return torch.cat([head - self._shift(rest, condition), rest], dim=-1)


class CVPN(nn.Module):
    """rotation, (coupling, rotation) × coupling_layers; conditioned on the class index `y`."""

    def __init__(
        self,
        dim: int,
        num_classes: int,
        coupling_layers: int = 4,
        hidden: int = 256,
        class_embedding: int = 16,
        num_invariants: int = 1,
        mean: torch.Tensor | np.ndarray | list | None = None,
    ):
        super().__init__()
        if dim < 2:
            raise ValueError(f"a cVPN needs at least 2 dimensions, got {dim}")
        if not 1 <= num_invariants < dim:
            raise ValueError(f"num_invariants must be in [1, {dim - 1}], got {num_invariants}")
        self.dim, self.num_classes, self.num_invariants = dim, num_classes, num_invariants
        self.coupling_layers, self.hidden, self.class_embedding = coupling_layers, hidden, class_embedding
        self.classes = nn.Embedding(num_classes, class_embedding)
        self.rotations = nn.ModuleList(Orthogonal(dim) for _ in range(coupling_layers + 1))
        self.couplings = nn.ModuleList(AdditiveCoupling(dim, class_embedding, hidden) for _ in range(coupling_layers))
        # `preprocess: center` lives inside the model, so forward/inverse take and give raw embeddings.
        center = torch.zeros(dim) if mean is None else torch.as_tensor(np.asarray(mean), dtype=torch.float32)
        self.register_buffer("center", center)

    def _condition(self, y: torch.Tensor | int, like: torch.Tensor) -> torch.Tensor:
        y = torch.as_tensor(y, device=like.device, dtype=torch.long)
        return self.classes(y.expand(like.shape[:-1])).to(like.dtype)

    def forward(self, x: torch.Tensor, y: torch.Tensor | int) -> torch.Tensor:
        return self._forward(x, self._condition(y, x), self._rotation_matrices())

    def inverse(self, z: torch.Tensor, y: torch.Tensor | int) -> torch.Tensor:
        return self._inverse(z, self._condition(y, z), self._rotation_matrices())

    def _rotation_matrices(self) -> list[torch.Tensor]:
        # matrix_exp dominates the cost of a step: compute each rotation once per call.
        return [rotation.matrix() for rotation in self.rotations]

    def _forward(self, x: torch.Tensor, condition: torch.Tensor, matrices: list[torch.Tensor]) -> torch.Tensor:
        z = self.rotations[0](x - self.center, matrices[0])
        for coupling, rotation, matrix in zip(self.couplings, self.rotations[1:], matrices[1:]):
            z = rotation(coupling(z, condition), matrix)
        return z

    def _inverse(self, z: torch.Tensor, condition: torch.Tensor, matrices: list[torch.Tensor]) -> torch.Tensor:
        for coupling, rotation, matrix in zip(reversed(self.couplings), reversed(self.rotations[1:]), reversed(matrices[1:])):
            z = coupling.inverse(rotation.inverse(z, matrix), condition)
        return self.rotations[0].inverse(z, matrices[0]) + self.center

    def invariants(self, z: torch.Tensor) -> torch.Tensor:
        return z[..., -self.num_invariants :]

    def project(self, x: torch.Tensor, y: torch.Tensor | int) -> torch.Tensor:
        """Map to the class's invariant manifold: zero the invariants and map back."""
        condition, matrices = self._condition(y, x), self._rotation_matrices()
        z = self._forward(x, condition, matrices)
        kept = z[..., : -self.num_invariants]
        return self._inverse(torch.cat([kept, torch.zeros_like(self.invariants(z))], dim=-1), condition, matrices)

    def architecture(self) -> dict:
        """What `load_cvpn` needs to rebuild the module before loading its weights."""
        return {key: getattr(self, key) for key in ARCHITECTURE_KEYS}


def load_cvpn(folder: str | Path) -> CVPN:
    """Rebuild a cVPN saved by `train-cvpn` (safetensors + config.json), in eval mode on the CPU."""
    weights, config = load_weights(folder, required=ARCHITECTURE_KEYS)
    model = CVPN(**{key: config[key] for key in ARCHITECTURE_KEYS})
    load_state(model, weights, Path(folder) / "model.safetensors")  # also restores the centering mean
    return model.eval()


def kept_components(points: np.ndarray, pca_variance_percent: float) -> int:
    """Smallest number of principal components explaining (100 - pca_variance_percent)% of the variance."""
    ratios = PCA().fit(points).explained_variance_ratio_
    target = (100.0 - pca_variance_percent) / 100.0
    # The tolerance keeps float round-off in the cumulative sum from costing a component.
    return int(min(np.searchsorted(np.cumsum(ratios), target - 1e-9) + 1, len(ratios)))


def count_invariants(embeddings: np.ndarray, labels: np.ndarray, pca_variance_percent: float) -> int:
    """k = dimensions beyond those PCA keeps, averaged over classes, rounded, within [1, D - 1]."""
    dim = embeddings.shape[1]
    per_class = [dim - kept_components(embeddings[labels == c], pca_variance_percent) for c in np.unique(labels)]
    return int(np.clip(round(float(np.mean(per_class))), 1, dim - 1))
