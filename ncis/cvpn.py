"""Conditional volume-preserving network (cVPN) and the PCA rule that sets its number of invariants.

The network is a stack of learned rotations and class-conditional additive couplings:
both have |det J| = 1 and an exact inverse, so densities in its output space are densities
of the embeddings, and low-density points there map back to embeddings of that class.
Its last `num_invariants` outputs are trained to be ~0 on a class's embeddings.

Two coupling designs: `conditioning="concat"` (ncis' own: the class embedding joins the MLP
input) and `"add"` (the paper's ConditionalMLP, LarsDoorenbos/NCIS nl-invs/nl_invariants/
model.py:59-89: the embedding, through SiLU + Linear, is added after the MLP's second layer).
`init="paper"` also follows that file (model.py:22-43): rotations parametrised by the strict
upper triangle of a U(-pi, pi) matrix, U(+-1/sqrt(D)) biases, couplings with PyTorch's default
initialisation; `init="identity"` starts every coupling at zero shift instead.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ncis.io import load_state, load_weights


# The config keys that rebuild a CVPN (the constructor's arguments, less the mean held in the weights).
ARCHITECTURE_KEYS = (
    "dim", "num_classes", "coupling_layers", "hidden", "class_embedding", "num_invariants",
    "activation", "conditioning", "init",
)  # fmt: skip
ACTIVATIONS = {"silu": nn.SiLU, "sigmoid": nn.Sigmoid}


class Orthogonal(nn.Module):
    """x -> exp(A - Aᵀ) x + b: exp of a skew-symmetric matrix is a rotation, so |det| = 1."""

    def __init__(self, dim: int, init: str = "identity"):
        super().__init__()
        # `paper` uses only A's strict upper triangle, as the reference does; `identity` all of A.
        self.upper = init == "paper"
        if self.upper:
            self.generator = nn.Parameter(torch.triu(torch.empty(dim, dim).uniform_(-math.pi, math.pi), diagonal=1))
            self.bias = nn.Parameter(torch.empty(dim).uniform_(-(dim**-0.5), dim**-0.5))
        else:
            # A random (not identity) start mixes the halves the next coupling splits.
            self.generator = nn.Parameter(torch.randn(dim, dim) / dim**0.5)
            self.bias = nn.Parameter(torch.zeros(dim))

    def matrix(self) -> torch.Tensor:
        generator = torch.triu(self.generator, diagonal=1) if self.upper else self.generator
        return torch.linalg.matrix_exp(generator - generator.T)

    # `matrix` may be passed in so one pass that goes forward and back computes it once.
    def forward(self, x: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
        return x @ (self.matrix() if matrix is None else matrix).T + self.bias

    def inverse(self, z: torch.Tensor, matrix: torch.Tensor | None = None) -> torch.Tensor:
        return (z - self.bias) @ (self.matrix() if matrix is None else matrix)


class ConcatShift(nn.Sequential):
    """MLP([rest, class embedding]) with two hidden layers."""

    def __init__(self, rest: int, out: int, class_embedding: int, hidden: int, activation: type[nn.Module]):
        super().__init__(
            nn.Linear(rest + class_embedding, hidden),
            activation(),
            nn.Linear(hidden, hidden),
            activation(),
            nn.Linear(hidden, out),
        )

    def forward(self, rest: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.cat([rest, condition], dim=-1))


class AddShift(nn.Module):
    """The paper's ConditionalMLP (model.py:59-89): Linear, act, Linear, + Linear(SiLU(embedding)), act, Linear, act, Linear."""

    def __init__(self, rest: int, out: int, class_embedding: int, hidden: int, activation: type[nn.Module]):
        super().__init__()
        self.pre = nn.Sequential(nn.Linear(rest, hidden), activation(), nn.Linear(hidden, hidden))
        self.post = nn.Sequential(activation(), nn.Linear(hidden, hidden), activation(), nn.Linear(hidden, out))
        self.embed = nn.Sequential(nn.SiLU(), nn.Linear(class_embedding, hidden))

    def forward(self, rest: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.post(self.pre(rest) + self.embed(condition))


SHIFTS = {"concat": ConcatShift, "add": AddShift}


class AdditiveCoupling(nn.Module):
    """First half += MLP(second half, class embedding): a shear, so |det| = 1 and the inverse subtracts."""

    def __init__(
        self,
        dim: int,
        class_embedding: int,
        hidden: int,
        activation: str = "silu",
        conditioning: str = "concat",
        init: str = "identity",
    ):
        super().__init__()
        self.split = dim // 2
        self.shift = SHIFTS[conditioning](dim - self.split, self.split, class_embedding, hidden, ACTIVATIONS[activation])
        if init == "identity":
            # Start as the identity so the untrained network is a plain rotation.
            last = self.shift[-1] if conditioning == "concat" else self.shift.post[-1]
            nn.init.zeros_(last.weight)
            nn.init.zeros_(last.bias)

    def _shift(self, rest: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        return self.shift(rest, condition)

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
        activation: str = "silu",
        conditioning: str = "concat",
        init: str = "identity",
        mean: torch.Tensor | np.ndarray | list | None = None,
    ):
        super().__init__()
        if dim < 2:
            raise ValueError(f"a cVPN needs at least 2 dimensions, got {dim}")
        if not 1 <= num_invariants < dim:
            raise ValueError(f"num_invariants must be in [1, {dim - 1}], got {num_invariants}")
        self.dim, self.num_classes, self.num_invariants = dim, num_classes, num_invariants
        self.coupling_layers, self.hidden, self.class_embedding = coupling_layers, hidden, class_embedding
        self.activation, self.conditioning, self.init = activation, conditioning, init
        # One class embedding shared by every coupling, as in the reference (model.py:119).
        self.classes = nn.Embedding(num_classes, class_embedding)
        self.rotations = nn.ModuleList(Orthogonal(dim, init) for _ in range(coupling_layers + 1))
        self.couplings = nn.ModuleList(
            AdditiveCoupling(dim, class_embedding, hidden, activation, conditioning, init) for _ in range(coupling_layers)
        )
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
    from sklearn.decomposition import PCA  # here: `sample` loads a cVPN and never counts (sklearn costs ~1 s of start-up)

    ratios = PCA().fit(points).explained_variance_ratio_
    target = (100.0 - pca_variance_percent) / 100.0
    # The tolerance keeps float round-off in the cumulative sum from costing a component.
    return int(min(np.searchsorted(np.cumsum(ratios), target - 1e-9) + 1, len(ratios)))


def count_invariants(
    embeddings: np.ndarray, labels: np.ndarray, pca_variance_percent: float, rule: str = "dropped_rounded"
) -> int:
    """Number of invariants k from per-class PCA, within [1, D - 1].

    `dropped_rounded`: k = dimensions beyond those PCA keeps, averaged over classes, rounded.
    `plus_one_floored`: the reference's rule (nl-invs/nl_invariants/trainer.py:55-71): D minus the
    index of the first component where the cumulative ratio exceeds the target, i.e. one more
    than the dropped dimensions, averaged over classes and floored.
    """
    dim = embeddings.shape[1]
    kept = [kept_components(embeddings[labels == c], pca_variance_percent) for c in np.unique(labels)]
    if rule == "plus_one_floored":
        count = math.floor(float(np.mean([dim - k + 1 for k in kept])))
    else:
        count = round(float(np.mean([dim - k for k in kept])))
    return int(np.clip(count, 1, dim - 1))
