"""Parameters: params.yaml loaded once into typed, validated objects.

Every front door (CLI, MLflow, DVC) reads the same file and applies the same
`section.key=value` overrides, so validation lives here and nowhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ncis import registry
from ncis.errors import UserError

DEFAULT_PARAMS = Path("params.yaml")


class Section(BaseModel):
    # Unknown keys are typos until proven otherwise; strict types stop "1e-3" strings
    # from silently becoming something else.
    model_config = ConfigDict(extra="forbid", frozen=True)


class DataParams(Section):
    root: str = Field("", description="folder holding the real datasets (cifar100, imagenet100); unused by digits")
    test_fraction: float = Field(0.25, gt=0, lt=1, description="digits: stratified test split")
    ood_size: int = Field(300, ge=10, description="digits: images per OOD test set")


class DiffusionParams(Section):
    model: str = Field(
        "",
        description="hub id, diffusers folder or single .ckpt/.safetensors file; empty = the benchmark's own "
        "(digits: the tiny model `prepare` trains)",
    )
    # Training of the tiny digits model (read by `prepare`).
    train_steps: int = Field(1150, ge=1)
    train_batch_size: int = Field(64, ge=1)
    train_lr: float = Field(2e-3, gt=0)
    cfg_dropout: float = Field(0.1, ge=0, lt=1, description="probability of training on the empty prompt")
    token_noise: float = Field(0.0, ge=0, description="std of Gaussian noise added to the class-token embedding in training")
    unet_channels: list[int] = Field(default_factory=lambda: [32, 64], min_length=1)
    text_width: int = Field(32, ge=4)


class EmbedParams(Section):
    prompt: str = "An image of a {}"
    steps: int = Field(3, ge=1)
    lr: float = Field(1e-2, gt=0)
    noise_draws: int = Field(32, ge=1)
    timestep_count: int = Field(50, ge=1, description="timesteps are randint(0, timestep_count) * timestep_stride + 1")
    timestep_stride: int = Field(20, ge=1)
    batch_size: int = Field(64, ge=1)
    chunk_size: int = Field(512, ge=1, description="images per saved chunk; an interrupted run resumes from the last chunk")
    image_limit: int = Field(0, ge=0, description="embed only N training images, evenly spaced over the set (0 = all)")


class CvpnParams(Section):
    coupling_layers: int = Field(4, ge=1)
    hidden: int = Field(256, ge=1)
    class_embedding: int = Field(16, ge=1)
    pca_variance_percent: float = Field(5.0, gt=0, lt=100)
    preprocess: Literal["none", "center"] = "none"
    lr: float = Field(1e-4, gt=0)
    lr_end_factor: float = Field(0.1, gt=0, le=1)
    batch_size: int = Field(64, ge=1)
    epochs: int = Field(200, ge=1)
    holdout_fraction: float = Field(0.1, ge=0, lt=1, description="stratified split the best epoch is chosen on (0 = choose on the training set)")
    activation: Literal["silu", "sigmoid"] = Field("silu", description="non-linearity of the coupling MLPs")
    conditioning: Literal["concat", "add"] = Field(
        "concat",
        description="concat: class embedding joins the coupling MLP's input; add: SiLU + Linear of it is added after the MLP's second layer",
    )
    init: Literal["identity", "paper"] = Field(
        "identity",
        description="identity: couplings start at zero shift; paper: PyTorch default couplings, rotations from the U(-pi, pi) upper triangle",
    )
    invariant_rule: Literal["dropped_rounded", "plus_one_floored"] = Field(
        "dropped_rounded", description="invariants from per-class PCA: dimensions it drops (rounded mean), or one more (floored mean)"
    )
    reconstruction_detach: bool = Field(
        False, description="the reconstruction step maps back the invariant step's output, detached: only the inverse pass learns from it"
    )


class SampleParams(Section):
    method: Literal["cvpn", "linear", "knn"] = "cvpn"
    candidates: int = Field(3330, ge=1)
    keep: int = Field(10, ge=1)
    rounds: int = Field(10, ge=1)
    reg: float = Field(1e-5, ge=0)
    knn_k: int = Field(5, ge=1)
    knn_noise: float = Field(0.1, ge=0)
    knn_boundary: int = Field(20, ge=1, description="knn: boundary embeddings per class that the noise is added around")

    @model_validator(mode="after")
    def _keep_fits(self):
        if self.keep > self.candidates:
            raise ValueError(f"sample.keep ({self.keep}) must not exceed sample.candidates ({self.candidates})")
        return self


class SynthesizeParams(Section):
    prompt: str = "A high-quality image of the {}"
    scheduler: str = "PNDMScheduler"
    steps: int = Field(50, ge=1)
    guidance_scale: float = Field(7.5, ge=1)
    noise_scale: float = Field(1.0, gt=0, description="std of the starting noise relative to the prior's (1 = the paper)")
    batch_size: int = Field(64, ge=1)
    images_per_class: int = Field(0, ge=0, description="0 = one image per outlier embedding")
    save_size: int = Field(32, ge=1)
    preview_per_class: int = Field(8, ge=1)
    control_per_class: int = Field(20, ge=0, description="images per class from unperturbed embeddings, for diagnostics (0 = none)")


class ClassifierParams(Section):
    arch: str = Field("resnet34", description="a name in ncis/registry.py ARCHITECTURES: resnet34, wrn40_2, small_cnn")
    init: str = Field(
        "",
        description="folder of a classifier train-classifier saved (e.g. a classifier.outliers=none run) to start from; empty = random init",
    )
    outliers: Literal["ncis", "none", "noise"] = "ncis"
    epochs: int = Field(250, ge=1)
    lr: float = Field(0.1, gt=0)
    lr_min: float = Field(0.0, ge=0, description="learning rate the cosine schedule ends at")
    momentum: float = Field(0.9, ge=0, lt=1)
    weight_decay: float = Field(5e-4, ge=0)
    batch_size: int = Field(256, ge=1)
    outlier_batch_size: int = Field(256, ge=1)
    max_outliers: int = Field(6400, ge=0, description="seeded random subset of the synthetic outliers (0 = all)")
    augment: Literal["crop", "resized_crop"] = Field("crop", description="crop: padded random crop; resized_crop: random resized crop")
    energy_weight: float = Field(0.1, ge=0)
    energy_head: Literal["free", "monotone", "mlp"] = Field(
        "free", description="P(ID | energy): free/monotone logistic regression (w >= 0 for monotone), or an MLP 1-hidden-2"
    )
    energy_head_hidden: int = Field(512, ge=1, description="hidden width of the mlp energy head")
    keep_checkpoints: int = Field(2, ge=1, description="newest per-epoch checkpoints kept for resuming")

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        return registry.check(registry.ARCHITECTURES, value, "architecture")


class EvaluateParams(Section):
    score: str = Field("energy", description="a name in ncis/registry.py SCORES: energy, msp, odin, mahalanobis, knn")
    ood_fraction: float = Field(
        0.0, ge=0, description="per OOD set, score a seeded random subset of this fraction of the ID test size (0 = all images)"
    )
    batch_size: int = Field(256, ge=1)
    odin_temperature: float = Field(1000.0, gt=0)
    odin_epsilon: float = Field(0.0014, ge=0)
    knn_k: int = Field(50, ge=1)

    @field_validator("score")
    @classmethod
    def _known_score(cls, value: str) -> str:
        return registry.check(registry.SCORES, value, "score")


class TrackingParams(Section):
    enabled: bool = Field(True, description="log to MLflow (MLFLOW_TRACKING_URI picks the server)")


class Params(Section):
    benchmark: str = "digits"
    seed: int = Field(0, ge=0)
    outputs: str = "outputs"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    data: DataParams = DataParams()
    diffusion: DiffusionParams = DiffusionParams()
    embed: EmbedParams = EmbedParams()
    cvpn: CvpnParams = CvpnParams()
    sample: SampleParams = SampleParams()
    synthesize: SynthesizeParams = SynthesizeParams()
    classifier: ClassifierParams = ClassifierParams()
    evaluate: EvaluateParams = EvaluateParams()
    tracking: TrackingParams = TrackingParams()

    @model_validator(mode="after")
    def _known_benchmark(self):
        from ncis.datasets import get_benchmark

        get_benchmark(self.benchmark)
        return self

    @property
    def out(self) -> Path:
        return Path(self.outputs)

    def flat(self) -> dict[str, Any]:
        """`section.key` -> value, the form MLflow logs and `--set` takes."""
        return _flatten(self.model_dump())


def _flatten(tree: dict, prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(_flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def parse_override(text: str) -> tuple[list[str], Any]:
    """`section.key=value` -> (["section", "key"], value parsed as YAML)."""
    key, sep, raw = text.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {text!r}: expected section.key=value, e.g. --set cvpn.lr=1e-3")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key.strip().split("."), value


def apply_overrides(tree: dict, overrides: list[str]) -> dict:
    for text in overrides:
        path, value = parse_override(text)
        node = tree
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"--set {text!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return tree


def _coerce_yaml_floats(tree: Any) -> Any:
    """YAML 1.1 reads `1e-3` as a string; a number written that way is meant as a float."""
    if isinstance(tree, dict):
        return {k: _coerce_yaml_floats(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_coerce_yaml_floats(v) for v in tree]
    if isinstance(tree, str):
        try:
            return float(tree) if any(c in tree for c in "eE.") and tree.strip()[0] in "+-.0123456789" else tree
        except ValueError:
            return tree
    return tree


def params_from_dict(tree: dict, source: str = "params") -> Params:
    try:
        return Params.model_validate(_coerce_yaml_floats(tree))
    except UserError as err:
        raise UserError(f"{source}: {err}") from None
    except ValidationError as err:
        first = err.errors()[0]
        key = ".".join(str(p) for p in first["loc"]) or "(top level)"
        message = first["msg"]
        if first["type"] == "extra_forbidden":
            message = "unknown key; check its spelling against params.yaml"
        elif "input" in first and not isinstance(first["input"], dict):
            message += f" (got {first['input']!r})"
        more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
        raise UserError(f"{source}: {key}: {message}{more}") from None


def load_params(path: str | Path | None = None, overrides: list[str] | None = None) -> Params:
    """Read a params file, apply `section.key=value` overrides, validate once."""
    path = Path(path) if path else DEFAULT_PARAMS
    tree: dict = {}
    if path.exists():
        try:
            tree = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as err:
            raise UserError(f"{path}: not valid YAML ({str(err).splitlines()[0]}); fix the file") from None
        if not isinstance(tree, dict):
            raise UserError(f"{path}: expected a mapping of sections at the top level")
    elif path != DEFAULT_PARAMS:
        raise UserError(f"{path}: no such parameter file; pass an existing file to --params")
    tree = apply_overrides(tree, overrides or [])
    return params_from_dict(tree, source=str(path))
