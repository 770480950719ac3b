"""MLflow tracking (placeholder until the tracking issue lands: runs nothing, logs nothing)."""

from __future__ import annotations

import contextlib


@contextlib.contextmanager
def pipeline_run(params):
    yield None


@contextlib.contextmanager
def stage_run(params, stage: str):
    yield None


def log_metrics(metrics: dict, step: int | None = None) -> None:
    """Log numeric metrics to the active stage run, if any."""


def log_artifact(path, artifact_path: str | None = None) -> None:
    """Log a file or folder to the active stage run, if any."""


def compare(experiment: str, runs):
    from ncis.errors import UserError

    raise UserError("`ncis compare` is not implemented yet")
