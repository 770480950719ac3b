"""Run one stage, or all of them in order, each inside its (optional) MLflow run."""

from __future__ import annotations

from ncis.cli import STAGES, stage_function
from ncis.config import Params


def run_stage(name: str, params: Params):
    from ncis import tracking

    function = stage_function(name)
    with tracking.stage_run(params, name):
        return function(params)


def run_pipeline(params: Params) -> None:
    from ncis import tracking

    functions = [(name, stage_function(name)) for name in STAGES]  # fail before any work if one is missing
    with tracking.pipeline_run(params):
        for name, function in functions:
            with tracking.stage_run(params, name):
                function(params)
