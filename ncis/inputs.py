"""What each stage reads, described for MLflow's dataset tracking (docs/tracking.md, "Datasets").

Paths come from the Layout and the OOD sets with their groups from the Benchmark registry, so a
new set or group is described here without a change. `ncis.tracking` logs these when a stage run
opens, with DVC's hash of each as its digest. Each path is one of the stage's DVC deps, or inside
one (tests/test_tracking.py checks it against dvc.yaml). Models a stage reads (the diffusion
model, the cVPN, a classifier) are not datasets: the run's `dvc.dep.*` tags name them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from ncis import registry
from ncis.datasets import get_benchmark
from ncis.layout import Layout, layout_for

# MLflow's `mlflow.data.context` of an input: what the stage does with it.
TRAINING = "training"  # a model or a distribution is fitted to it
TESTING = "testing"  # scored for the reported results
VALIDATION = "validation"  # scored for choosing settings (Benchmark.validation_ood_sets)
GENERATION = "generation"  # rendered into images (synthesize)
REFERENCE = "reference"  # compared against (synthesize's diagnostics)
GROUP_TAG = "ncis.ood_group"  # an OOD set's group (near, far, ...), from the Benchmark registry


@dataclass(frozen=True)
class DataInput:
    name: str  # the path under the outputs folder: data/train, data/ood/letters, embed/embeddings.npz
    path: Path
    context: str
    tags: dict[str, str] = field(default_factory=dict)


def stage_inputs(stage: str, params) -> list[DataInput]:
    """The data `stage` reads under `params` (none for prepare, whose sources are the benchmark's own,
    for import-classifier, and for evaluate under the openood_v1.5 protocol, which reads OpenOOD's lists)."""
    layout = layout_for(params)
    benchmark = get_benchmark(params.benchmark)

    def data(path: Path, context: str, **tags: str) -> DataInput:
        return DataInput(path.relative_to(layout.root).as_posix(), path, context, tags)

    classifier_train = benchmark.classifier_train_images(layout, params.classifier.augment)
    if stage == "embed":
        return [data(benchmark.original_train_images(layout), TRAINING)]
    if stage in ("train-cvpn", "sample"):
        return [data(layout.embeddings, TRAINING)]
    if stage == "synthesize":
        return [data(layout.outliers, GENERATION), data(layout.embeddings, GENERATION), data(layout.id_train, REFERENCE)]
    if stage == "pretrain-classifier":
        return [data(classifier_train, TRAINING)] if params.pretrain.epochs else []
    if stage == "train-classifier":
        outliers = [data(layout.synthetic_images, TRAINING)] if params.classifier.outliers == "ncis" else []
        return [data(classifier_train, TRAINING), *outliers]
    if stage == "evaluate" and params.evaluate.protocol == "paper":
        return _evaluation_inputs(layout, benchmark, params, data)
    return []


def _evaluation_inputs(layout: Layout, benchmark, params, data) -> list[DataInput]:
    fitted = registry.resolve(registry.SCORES, params.evaluate.score, "evaluate.score").needs_fit
    return [
        *([data(layout.id_train, TRAINING)] if fitted else []),  # mahalanobis, knn: fitted on ID training features
        data(layout.id_test, TESTING),
        *(data(layout.ood(name), TESTING, **{GROUP_TAG: group}) for name, group in benchmark.ood_sets.items()),
        *(data(layout.ood_val(name), VALIDATION, **{GROUP_TAG: group}) for name, group in benchmark.validation_ood_sets.items()),
    ]
