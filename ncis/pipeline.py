"""The pipeline: its stages in order, and running one or all of them inside their MLflow runs.

The front doors (the `ncis` CLI, MLproject's entry points, dvc.yaml's stages) are built from
`STAGES`; nothing here knows about them.
"""

from __future__ import annotations

import importlib
from typing import Callable

from ncis.config import Params
from ncis.errors import UserError
from ncis.signals import in_stage

# stage name -> (module, one-line description). Order is pipeline order.
STAGES: dict[str, tuple[str, str]] = {
    "prepare": ("ncis.prepare", "materialise the benchmark's datasets (digits: also train the tiny diffusion model)"),
    "embed": ("ncis.embed", "textual inversion: one class-token embedding per training image"),
    "train-cvpn": ("ncis.train_cvpn", "train the conditional volume-preserving network on the embeddings"),
    "sample": ("ncis.sample", "draw low-density outlier embeddings per class"),
    "synthesize": ("ncis.synthesize", "generate outlier images from the outlier embeddings"),
    "pretrain-classifier": ("ncis.pretrain_classifier", "phase 1 of a two-phase classifier: cross-entropy alone (imagenet100; a no-op at pretrain.epochs 0)"),
    "train-classifier": ("ncis.train_classifier", "train the classifier with the energy regulariser on ID + outliers"),
    "evaluate": ("ncis.evaluate", "FPR95 / AUROC / AUPR and ID accuracy against the OOD test sets"),
}


def _check_stage(name: str) -> None:
    if name not in STAGES:
        raise UserError(f"unknown stage {name!r}; choose one of {', '.join(STAGES)}")


def stage_function(name: str) -> Callable[[Params], object]:
    """The `main(params)` of stage `name` (imported on demand: a stage pays only for its own imports)."""
    _check_stage(name)
    module_name, _ = STAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            raise UserError(f"stage {name!r} is not implemented yet") from None
        raise
    return module.main


# Stages that split their work across torchrun's processes (ncis.distributed); the others run on
# rank 0 alone while the other ranks wait.
SHARDED_STAGES = ("embed", "synthesize", "pretrain-classifier", "train-classifier")


def on_ranks(name: str, function, params: Params):
    from ncis import distributed

    if not distributed.active():
        return function(params)
    result = function(params) if name in SHARDED_STAGES or distributed.is_main() else None
    # Every rank waits for rank 0's writes: the next stage reads them (a sharded stage's other
    # ranks return while rank 0 still merges and writes).
    distributed.barrier()
    return result


def run_stage(name: str, params: Params, run_name: str | None = None):
    from ncis import tracking

    function = stage_function(name)
    with tracking.stage_run(params, name, run_name), in_stage(name):
        return on_ranks(name, function, params)


def run_pipeline(params: Params, run_name: str | None = None, first_stage: str = "prepare") -> None:
    """Every stage in order, or from `first_stage` on (its inputs being those earlier stages wrote)."""
    from ncis import tracking

    _check_stage(first_stage)
    names = list(STAGES)
    functions = [(name, stage_function(name)) for name in names[names.index(first_stage) :]]  # fail before any work if one is missing
    with tracking.pipeline_run(params, run_name):
        for name, function in functions:
            with tracking.stage_run(params, name), in_stage(name):
                on_ranks(name, function, params)
