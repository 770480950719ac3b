"""Parameters: params.yaml loaded once into typed, validated objects.

Every front door (CLI, MLflow, DVC) reads the same file and applies the same
`section.key=value` overrides, so validation lives here and nowhere else.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ncis import registry
from ncis.errors import UserError

DEFAULT_PARAMS = Path("params.yaml")


# Keys that say where or how a run happens, never what it computes: DVC does not rerun a stage for
# them, and run names and `ncis compare` leave them out.
PLACEMENT_KEYS = frozenset({"outputs", "device", "process_group_timeout_minutes", "tracking.enabled", "diffusion.allow_pickle", "embed.gradient_checkpointing"})


class Section(BaseModel):
    # Unknown keys are typos until proven otherwise; strict types refuse a "0.1" string or a
    # float where an int is meant instead of converting it (an int is still a valid float).
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


# No field below has a default: every value lives in params.yaml (digits) or configs/*.yaml
# (the paper's benchmarks), so no experiment silently runs on a value its file does not show.
# `None` marks a key that only some benchmarks use; `Benchmark.needs` names the ones each requires.
# Likewise for the evaluation protocols: the keys each requires (the paper protocol none), so a
# CIFAR-100 run that never evaluates under OpenOOD needs no OpenOOD folder.
PROTOCOL_NEEDS = {"openood_v1.5": ("evaluate.openood_root",)}


class DataParams(Section):
    root: str | None = Field(None, description="real benchmarks: folder holding the datasets (layout: docs/reproducing.md)")
    test_fraction: float | None = Field(None, gt=0, lt=1, description="digits: stratified test split")
    ood_size: int | None = Field(None, ge=10, description="digits: images per OOD test set")


class DiffusionParams(Section):
    model: str = Field(
        description="hub id, diffusers folder or single .ckpt/.safetensors file; empty = the benchmark's own "
        "(digits: the tiny model `prepare` trains)",
    )
    allow_pickle: bool = Field(
        description="load a pickled .ckpt (or .bin weights in a diffusers folder); unpickling runs any code the "
        "file holds, so only for files you trust (docs/troubleshooting.md)",
    )
    # Training of the tiny digits model (read by `prepare`).
    train_steps: int | None = Field(None, ge=1, description="digits: optimisation steps of the tiny model")
    train_batch_size: int | None = Field(None, ge=1, description="digits: tiny-model training batch")
    train_lr: float | None = Field(None, gt=0, description="digits: tiny-model AdamW learning rate (cosine to 0)")
    cfg_dropout: float | None = Field(None, ge=0, lt=1, description="digits: probability of training on the empty prompt")
    token_noise: float | None = Field(
        None, ge=0, description="digits: std of Gaussian noise added to the class-token embedding in training"
    )
    unet_channels: list[int] | None = Field(None, min_length=1, description="digits: UNet block widths")
    text_width: int | None = Field(None, ge=4, description="digits: text-encoder width = token-embedding dimension")


class EmbedParams(Section):
    prompt: str = Field(description="textual-inversion prompt; '{}' is the class token")
    steps: int = Field(ge=1, description="Adam steps per image")
    lr: float = Field(gt=0, description="Adam learning rate of the token vector")
    noise_draws: int = Field(ge=1, description="noise/timestep draws averaged per step")
    timestep_count: int = Field(ge=1, description="timesteps are randint(0, timestep_count) * timestep_stride + 1")
    timestep_stride: int = Field(ge=1, description="see timestep_count")
    batch_size: int = Field(ge=1, description="images optimised together (results do not depend on it)")
    chunk_size: int = Field(ge=1, description="images per saved chunk; an interrupted run resumes from the last chunk")
    image_limit: int = Field(ge=0, description="embed only N training images, evenly spaced over the set (0 = all)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        description="precision of the diffusion model's weights (auto = float32 on CPU, float16 on CUDA); the token "
        "vectors, the noising and the loss stay float32 (docs/stable-diffusion.md)"
    )
    gradient_checkpointing: bool = Field(
        description="recompute the UNet's activations in the backward pass instead of keeping them: far less memory "
        "per image (32 draws of SD at 512), more compute, the same vectors"
    )


class CvpnParams(Section):
    coupling_layers: int = Field(ge=1, description="class-conditional additive coupling layers")
    hidden: int = Field(ge=1, description="width of each coupling MLP")
    class_embedding: int = Field(ge=1, description="size of the learned class embedding fed to the couplings")
    pca_variance_percent: float = Field(
        gt=0, lt=100, description="output dimensions counted as invariants: those of the last N% of PCA variance"
    )
    preprocess: Literal["none", "center"] = Field(description="center: subtract each class's mean first")
    lr: float = Field(gt=0, description="Adam learning rate")
    lr_end_factor: float = Field(gt=0, le=1, description="linear decay of the learning rate to lr * lr_end_factor")
    batch_size: int = Field(ge=1, description="embeddings per step")
    epochs: int = Field(ge=1, description="passes over the embeddings")
    holdout_fraction: float = Field(
        ge=0, lt=1, description="embeddings held out to pick the best epoch (0 = pick it on the training embeddings)"
    )
    activation: Literal["silu", "sigmoid"] = Field(description="non-linearity of the coupling MLPs")
    conditioning: Literal["concat", "add"] = Field(
        description="concat: the class embedding joins the coupling MLP's input; add: SiLU + Linear of it is added "
        "after the MLP's second layer"
    )
    init: Literal["identity", "paper"] = Field(
        description="identity: couplings start at zero shift; paper: PyTorch's default coupling init, rotations from "
        "the upper triangle of a U(-pi, pi) matrix"
    )
    invariant_rule: Literal["dropped_rounded", "plus_one_floored"] = Field(
        description="invariants from per-class PCA: the dimensions it drops (mean rounded), or one more (mean floored)"
    )
    reconstruction_detach: bool = Field(
        description="the reconstruction step maps back the invariant step's output, detached: only the inverse pass learns from it"
    )


class SampleParams(Section):
    method: Literal["cvpn", "linear", "knn"] = Field(description="cvpn = NCIS; linear and knn are baselines")
    candidates: int = Field(ge=1, description="candidates drawn per class and round")
    keep: int = Field(ge=1, description="lowest-density candidates kept per class and round")
    rounds: int = Field(ge=1, description="sampling rounds per class")
    reg: float = Field(ge=0, description="added to the covariance diagonal before inverting it")
    knn_k: int = Field(ge=1, description="knn: neighbour whose distance scores a candidate")
    knn_noise: float = Field(ge=0, description="knn: std of the noise added around boundary embeddings")
    knn_boundary: int = Field(ge=1, description="knn: boundary embeddings per class that the noise is added around")

    @model_validator(mode="after")
    def _keep_fits(self):
        if self.keep > self.candidates:
            raise ValueError(f"sample.keep ({self.keep}) must not exceed sample.candidates ({self.candidates})")
        return self


class SynthesizeParams(Section):
    prompt: str = Field(description="synthesis prompt; '{}' is the class token, replaced by the outlier embedding")
    scheduler: str = Field(description="diffusers scheduler class (PNDMScheduler = the paper's PLMS)")
    steps: int = Field(ge=1, description="denoising steps")
    guidance_scale: float = Field(ge=1, description="classifier-free guidance against the empty prompt (1 = none)")
    noise_scale: float = Field(gt=0, description="std of the starting noise relative to the prior's (1 = the paper)")
    batch_size: int = Field(ge=1, description="images rendered together (results do not depend on it)")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        description="precision of the diffusion model's weights (auto = float32 on CPU, float16 on CUDA); images are "
        "decoded to float32 before they are resized and saved (docs/stable-diffusion.md)"
    )
    images_per_embedding: int = Field(ge=1, description="images rendered from each outlier embedding, each from its own starting noise")
    images_per_class: int = Field(
        ge=0,
        description="images per class; image k renders outlier embedding k // images_per_embedding (cycling through "
        "the pool); 0 = every outlier embedding, images_per_embedding times",
    )
    save_size: int = Field(ge=1, description="side of the saved images in pixels (decoded at the model's resolution, then resized)")
    preview_per_class: int = Field(ge=1, description="outliers per class in preview.png")
    control_per_class: int = Field(ge=0, description="images per class from unperturbed embeddings, for diagnostics (0 = none)")


# classifier.init's value for "the classifier the pretrain-classifier stage wrote" (<outputs>/pretrained_classifier).
PRETRAINED_INIT = "pretrain-classifier"


class PretrainParams(Section):
    """Phase 1 of a two-phase classifier (the paper's ImageNet-100 recipe): cross-entropy on the ID
    images alone, with the classifier section's backbone, optimiser, schedule, augmentation and
    precision; train-classifier then fine-tunes it (classifier.init: pretrain-classifier)."""

    epochs: int = Field(ge=0, description="phase-1 epochs (0 = no phase 1: the pretrain-classifier stage does nothing)")
    batch_size: int = Field(ge=1, description="phase-1 ID images per step")


class ClassifierParams(Section):
    arch: str = Field(description="backbone, a name in ncis/registry.py ARCHITECTURES (resnet34, wrn40_2, small_cnn)")
    init: str = Field(
        description="folder of a classifier train-classifier saved (e.g. by a classifier.outliers=none run) to start "
        f"from; {PRETRAINED_INIT} = the one the pretrain-classifier stage trained (phase 1); empty = random initialisation"
    )
    outliers: Literal["ncis", "none", "noise"] = Field(description="ncis = synthesized images; none = cross-entropy only")
    epochs: int = Field(ge=1, description="training epochs (cosine schedule over all of them)")
    lr: float = Field(gt=0, description="SGD learning rate")
    lr_min: float = Field(ge=0, description="learning rate the cosine schedule ends at")
    momentum: float = Field(ge=0, lt=1, description="SGD momentum (Nesterov)")
    weight_decay: float = Field(ge=0, description="SGD weight decay")
    batch_size: int = Field(ge=1, description="ID images per step")
    outlier_batch_size: int = Field(ge=1, description="outlier images per step")
    max_outliers: int = Field(ge=0, description="outlier images used at most (a seeded subset; 0 = all)")
    augment: Literal["crop", "resized_crop"] = Field(
        description="training augmentation: crop = padded random crop; resized_crop = random resized crop"
    )
    energy_weight: float = Field(ge=0, description="weight of the energy regulariser (0 = cross-entropy only)")
    energy_head: Literal["free", "monotone", "mlp"] = Field(
        description="head on the energy: logistic with free sign or constrained (w >= 0), or an MLP 1-hidden-2"
    )
    energy_head_hidden: int = Field(ge=1, description="mlp energy head: hidden width")
    keep_checkpoints: int = Field(ge=1, description="newest per-epoch checkpoints kept for resuming")
    num_workers: Literal["auto"] | Annotated[int, Field(ge=0)] = Field(
        description="DataLoader worker processes (auto = 8 at most on CUDA, with pinned memory; 0 on the CPU, where "
        "workers compete with training); each worker draws its own augmentations, so the count changes results"
    )
    precision: Literal["auto", "float32", "bfloat16"] = Field(
        description="classifier training precision: bfloat16 = autocast on CUDA (channels_last is always used there); "
        "auto = bfloat16 on CUDA, float32 on the CPU; changes results"
    )

    @field_validator("arch")
    @classmethod
    def _known_arch(cls, value: str) -> str:
        return registry.check(registry.ARCHITECTURES, value, "architecture")


class EvaluateParams(Section):
    score: str = Field(description="OOD score, a name in ncis/registry.py SCORES (energy, msp, odin, mahalanobis, knn)")
    ood_fraction: float = Field(
        ge=0, description="per OOD set, score a seeded random subset of this fraction of the ID test size (0 = all images)"
    )
    batch_size: int = Field(ge=1, description="images per forward pass")
    odin_temperature: float = Field(gt=0, description="odin: softmax temperature")
    odin_epsilon: float = Field(ge=0, description="odin: input perturbation size")
    knn_k: int = Field(ge=1, description="knn: neighbour whose distance is the score")
    protocol: Literal["paper", "openood_v1.5"] = Field(
        description="paper: the benchmark's own OOD sets, metrics.json; openood_v1.5 (cifar100 only): OpenOOD v1.5's "
        "image lists, preprocessing and metric conventions, all images, metrics_openood_v1.5.json and openood_v1.5.csv "
        "(docs/reproducing.md)"
    )
    openood_root: str | None = Field(
        None, description="protocol openood_v1.5 (cifar100): the folder OpenOOD's download script filled (benchmark_imglist/, images_classic/)"
    )

    @field_validator("score")
    @classmethod
    def _known_score(cls, value: str) -> str:
        return registry.check(registry.SCORES, value, "score")


class TrackingParams(Section):
    enabled: bool = Field(description="log to MLflow (MLFLOW_TRACKING_URI picks the server)")


class Params(Section):
    benchmark: str = Field(description="digits, cifar100 or imagenet100")
    seed: int = Field(ge=0, description="seeds every stage")
    outputs: str = Field(description="folder of every stage's outputs")
    device: Literal["auto", "cpu", "cuda"] = Field(description="auto = cuda when a GPU is visible")
    process_group_timeout_minutes: float = Field(
        gt=0,
        description="under torchrun, how long a rank waits for the others (e.g. for rank 0 through a stage it runs "
        "alone) before giving up; raise it for stages longer than this on rank 0",
    )
    compile: bool = Field(
        description="torch.compile the diffusion UNet (embed, synthesize) and the classifier (train-classifier): faster "
        "on a GPU after a warm-up, slower on a small CPU job; fused kernels round differently, so it changes results slightly"
    )
    data: DataParams
    diffusion: DiffusionParams
    embed: EmbedParams
    cvpn: CvpnParams
    sample: SampleParams
    synthesize: SynthesizeParams
    pretrain: PretrainParams
    classifier: ClassifierParams
    evaluate: EvaluateParams
    tracking: TrackingParams

    @model_validator(mode="after")
    def _benchmark_keys_set(self):
        from ncis.datasets import get_benchmark

        flat = self.flat()
        missing = [key for key in get_benchmark(self.benchmark).needs if flat.get(key) is None]
        if missing:
            raise UserError(f"{missing[0]}: required by the {self.benchmark} benchmark; set it in the params file")
        return self

    @model_validator(mode="after")
    def _protocol_fits_benchmark(self):
        if self.evaluate.protocol == "openood_v1.5" and self.benchmark != "cifar100":
            raise UserError(
                f"evaluate.protocol=openood_v1.5 covers benchmark cifar100 only, not {self.benchmark}; "
                "set evaluate.protocol=paper (ImageNet-200: docs/reproducing.md)"
            )
        missing = [key for key in PROTOCOL_NEEDS.get(self.evaluate.protocol, ()) if self.flat().get(key) is None]
        if missing:
            raise UserError(f"{missing[0]}: required by evaluate.protocol={self.evaluate.protocol}; set it in the params file")
        return self

    @model_validator(mode="after")
    def _pretrain_feeds_init(self):
        # Phase 1 and its use are one choice: neither a phase 2 without its phase 1, nor a phase 1
        # that nothing starts from (a run of hours thrown away).
        starts_from_it = self.classifier.init == PRETRAINED_INIT
        if starts_from_it and not self.pretrain.epochs:
            raise UserError(
                f"classifier.init={PRETRAINED_INIT} starts from phase 1, which pretrain.epochs=0 skips; "
                "set pretrain.epochs above 0, or classifier.init to a folder or empty"
            )
        if self.pretrain.epochs and not starts_from_it:
            raise UserError(
                f"pretrain.epochs={self.pretrain.epochs} trains a phase-1 classifier nothing starts from; "
                f"set classifier.init={PRETRAINED_INIT}, or pretrain.epochs=0"
            )
        return self

    def flat(self) -> dict[str, Any]:
        """`section.key` -> value, the form MLflow logs and `--set` takes."""
        return _flatten(self.model_dump())


def is_placement(key: str) -> bool:
    """`key`, or every key of the section it names, says where or how a run happens, not what."""
    if key in PLACEMENT_KEYS:
        return True
    field = Params.model_fields.get(key)
    section = field.annotation if field else None
    return isinstance(section, type) and issubclass(section, BaseModel) and all(
        f"{key}.{name}" in PLACEMENT_KEYS for name in section.model_fields
    )


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
        elif first["type"] == "missing":
            message = "missing; every key needs a value (params.yaml lists them all)"
        elif "input" in first and not isinstance(first["input"], dict):
            message += f" (got {first['input']!r})"
        more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
        raise UserError(f"{source}: {key}: {message}{more}") from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """safe_load that refuses a key stated twice in one mapping (plain YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(None, None, f"key {key!r} stated twice", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def read_params_file(path: str | Path) -> dict:
    """The raw mapping of a params file; one-line errors for a missing, invalid or ambiguous file."""
    path = Path(path)
    if not path.is_file():
        where = "in this folder; run from the repository root or" if path == DEFAULT_PARAMS else "here;"
        raise UserError(f"{path}: no such parameter file {where} pass an existing file to --params")
    try:
        tree = yaml.load(path.read_text(), Loader=_UniqueKeyLoader) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path}: not valid YAML ({' '.join(str(err).split())}); fix the file") from None
    if not isinstance(tree, dict):
        raise UserError(f"{path}: expected a mapping of sections at the top level")
    return tree


def load_params(path: str | Path | None = None, overrides: list[str] | None = None) -> Params:
    """Read a params file (default: ./params.yaml), apply `section.key=value` overrides, validate once.

    A missing file is an error, never a fallback: the values live in the file alone.
    """
    path = Path(path) if path else DEFAULT_PARAMS
    tree = apply_overrides(read_params_file(path), overrides or [])
    return params_from_dict(tree, source=str(path))
