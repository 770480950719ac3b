"""MLflow tracking: one run per stage, nested under a parent run when the whole pipeline runs.

MLflow's own conventions throughout: `MLFLOW_TRACKING_URI` picks the server (default: MLflow's
local default), the experiment is named after the benchmark, and a run started by `mlflow run`
(which sets `MLFLOW_RUN_ID`) becomes the parent of the stage runs. Every stage run carries all
parameters flattened (`cvpn.lr`), since a stage's results depend on its upstream stages' too,
plus the tag `ncis.stage` by which `compare` finds the `evaluate` runs.

With `tracking.enabled: false` every function here is a no-op. The logging helpers are no-ops
outside a run, so a stage can call them unconditionally.
"""

from __future__ import annotations

import contextlib
import functools
import os
import subprocess
import sys
from collections.abc import Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

from ncis.errors import UserError

STAGE_TAG = "ncis.stage"
PIPELINE = "pipeline"  # run name and stage tag of the parent run
# Params that do not change results: left out when `compare` groups runs by parameter set.
NOT_RESULT_PARAMS = frozenset({"outputs", "tracking.enabled"})
COMPARED_METRICS = ("fpr95/average", "auroc/average", "id_accuracy")


# ---------------------------------------------------------------- runs


def pipeline_run(params) -> contextlib.AbstractContextManager[Any]:
    """Parent run of a whole pipeline: the `mlflow run` project run if there is one, else a new run."""
    return _open_run(params, PIPELINE)


def stage_run(params, stage: str) -> contextlib.AbstractContextManager[Any]:
    """The run of one stage, nested under the active run, or under the `mlflow run` project run."""
    return _open_run(params, stage)


@contextlib.contextmanager
def _open_run(params, name: str) -> Iterator[Any]:
    """Run `name` (the pipeline or a stage): nested under an active run (e.g. a notebook's own, or
    the pipeline's), else at the top level; yields None with tracking off."""
    if not params.tracking.enabled:
        yield None
        return
    import mlflow

    check_server()
    if mlflow.active_run() is not None:
        with _running(params, name, nested=True) as run:
            yield run
    elif name != PIPELINE and os.environ.get("MLFLOW_RUN_ID"):
        # `mlflow run -e <stage>`: the project run holds the -P parameters as given; the stage
        # run below it looks exactly like one under `ncis run`, whatever the front door.
        with _top_level_run(params, PIPELINE), _running(params, name, nested=True) as run:
            yield run
    else:
        with _top_level_run(params, name) as run:
            yield run


@contextlib.contextmanager
def _top_level_run(params, name: str) -> Iterator[Any]:
    import mlflow

    project_run_id = os.environ.pop("MLFLOW_RUN_ID", None)
    if project_run_id is None:
        with _running(params, name, experiment_id=_experiment_id(params.benchmark)) as run:
            yield run
        return
    # Resume the run `mlflow run` created. Popped from the environment because
    # `mlflow.start_run` would otherwise resume it again in place of every nested run.
    with _running(params, None, run_id=project_run_id) as run:
        experiment = mlflow.get_experiment(run.info.experiment_id).name
        if experiment != params.benchmark:
            print(
                f"ncis: note: logging to MLflow experiment {experiment!r}; pass --experiment-name "
                f"{params.benchmark} to `mlflow run` to keep runs of this benchmark together",
                file=sys.stderr,
            )
        yield run


@contextlib.contextmanager
def _running(params, stage: str | None, **start_kwargs) -> Iterator[Any]:
    """Start (or resume) a run, log params and tags; FAILED/KILLED if the body raises, then re-raise.

    `stage` None: a resumed `mlflow run` project run, which keeps its own name.
    """
    import mlflow
    from mlflow.entities import RunStatus

    if stage is not None:
        start_kwargs["run_name"] = stage
    start_kwargs["tags"] = {STAGE_TAG: stage or PIPELINE, **_provenance_tags(stage)}
    if start_kwargs.get("nested"):
        start_kwargs.setdefault("experiment_id", mlflow.active_run().info.experiment_id)
    run = mlflow.start_run(**start_kwargs)
    _logging_lost.clear()
    status = RunStatus.FAILED
    try:
        _log_params(run, params.flat())
        yield run
        status = RunStatus.FINISHED
    except KeyboardInterrupt:
        status = RunStatus.KILLED
        raise
    finally:
        # Best effort: a server lost meanwhile must not turn a finished stage into a failed one.
        try:
            mlflow.end_run(RunStatus.to_string(status))
        except Exception as err:
            _report_lost(err)


def _experiment_id(name: str) -> str:
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    experiment = client.get_experiment_by_name(name)
    if experiment is not None:
        return experiment.experiment_id
    try:
        return client.create_experiment(name)
    except MlflowException:  # created meanwhile by a parallel run
        return client.get_experiment_by_name(name).experiment_id


def _log_params(run, flat: Mapping[str, Any]) -> None:
    """Log in batches of MLflow's per-request maximum; keys the run already has are kept as they are.

    A resumed `mlflow run` run already holds the `-P` values as typed ("1e-3"), and MLflow refuses
    to change a logged param, even to the same number spelled "0.001".
    """
    from mlflow import MlflowClient
    from mlflow.entities import Param
    from mlflow.utils.validation import MAX_PARAM_VAL_LENGTH, MAX_PARAMS_TAGS_PER_BATCH

    logged = run.data.params
    todo = [Param(k, str(v)[:MAX_PARAM_VAL_LENGTH]) for k, v in flat.items() if k not in logged]
    for start in range(0, len(todo), MAX_PARAMS_TAGS_PER_BATCH):
        MlflowClient().log_batch(run.info.run_id, params=todo[start : start + MAX_PARAMS_TAGS_PER_BATCH])


# ---------------------------------------------------------------- provenance tags


def _provenance_tags(stage: str | None) -> dict[str, str]:
    tags = dict(_git_tags(os.getcwd()))  # a copy: the cached dict is shared
    if stage is not None:
        tags.update({f"dvc.dep.{path}": digest for path, digest in dvc_input_hashes(stage).items()})
    return tags


@functools.cache
def _git_tags(folder: str) -> dict[str, str]:
    """Commit and dirty flag of the checkout in `folder`; {} outside git. Once per process."""
    from mlflow.utils.mlflow_tags import MLFLOW_GIT_COMMIT

    commit = _git(folder, "rev-parse", "HEAD")
    if not commit:
        return {}
    # Untracked files (a local mlflow.db, notes) do not make the code differ from the commit.
    dirty = bool(_git(folder, "status", "--porcelain", "--untracked-files=no"))
    # MLFLOW_GIT_COMMIT is MLflow's own tag, which its UI shows.
    return {MLFLOW_GIT_COMMIT: commit, "ncis.git_dirty": str(dirty).lower()}


def _git(folder: str, *args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return done.stdout.strip() if done.returncode == 0 else None


def dvc_input_hashes(stage: str, lock_file: str | Path = "dvc.lock") -> dict[str, str]:
    """Dependency path -> DVC hash of a stage's inputs, from `dvc.lock`; {} where unknown.

    A dependency produced by another stage takes that stage's `outs` entry: under `dvc repro` it
    is already updated when this stage starts, while this stage's own `deps` entry is the previous
    run's until DVC rewrites it afterwards.
    """
    import yaml

    try:
        stages = (yaml.safe_load(Path(lock_file).read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return {}
    produced = {out["path"]: _dvc_hash(out) for entry in stages.values() for out in entry.get("outs") or []}
    hashes = {}
    for dep in (stages.get(stage) or {}).get("deps") or []:
        digest = produced.get(dep["path"]) or _dvc_hash(dep)
        if digest:
            hashes[dep["path"]] = digest
    return hashes


def _dvc_hash(entry: Mapping[str, Any]) -> str | None:
    return entry.get("md5") or entry.get("etag") or entry.get("checksum")


# ---------------------------------------------------------------- server check


RUN_WITHOUT_TRACKING = "or run without tracking: --no-tracking (same as --set tracking.enabled=false)"


def check_server(fix: str = RUN_WITHOUT_TRACKING) -> None:
    """Refuse to start when an http(s) tracking server does not answer, instead of MLflow's minutes of retries."""
    import mlflow
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        # MLflow's own request helper: it honours MLFLOW_TRACKING_TOKEN / _INSECURE_TLS / ... .
        response = http_request(get_default_host_creds(uri), "/health", "GET", max_retries=0, timeout=5)
        reachable = response.status_code < 500
    except Exception:  # connection refused, DNS, timeout: all mean "not there"
        reachable = False
    if not reachable:
        raise UserError(
            f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) does not answer; start it, "
            f"point MLFLOW_TRACKING_URI at another, {fix}"
        )


# ---------------------------------------------------------------- logging helpers (no-ops outside a run)


def _active():
    # Not imported yet: no run can be active, and a run without tracking need not pay for the import.
    mlflow = sys.modules.get("mlflow")
    return mlflow.active_run() if mlflow else None


_logging_lost: list[str] = []  # the first failed logging call of the current run, if any


def _report_lost(err: Exception) -> None:
    if not _logging_lost:
        reason = (str(err).strip().splitlines() or [type(err).__name__])[0][:200]
        _logging_lost.append(reason)
        print(
            f"ncis: warning: MLflow logging failed ({type(err).__name__}: {reason}); the stage goes on and writes "
            "its outputs, but its MLflow run stays incomplete",
            file=sys.stderr,
        )


def _best_effort(log):
    """Logging never costs work: once a call fails (server gone, its disk full) the failure is
    reported in one line and the run's later calls are skipped, each of which would wait out
    MLflow's retries (MLFLOW_HTTP_REQUEST_MAX_RETRIES) again."""

    @functools.wraps(log)
    def logged(*args, **kwargs):
        if _logging_lost:
            return None
        try:
            return log(*args, **kwargs)
        except Exception as err:
            _report_lost(err)
            return None

    return logged


@_best_effort
def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    """Log numeric metrics to the active run, if any; None values (not computed) are skipped."""
    if _active() is None:
        return
    import mlflow

    mlflow.log_metrics({k: float(v) for k, v in metrics.items() if v is not None}, step=step)


@_best_effort
def log_artifact(path, artifact_path: str | None = None) -> None:
    """Log a file, or a folder as a folder of the same name (unless `artifact_path` says otherwise)."""
    if _active() is None:
        return
    import mlflow

    path = Path(path)
    if path.is_dir():
        mlflow.log_artifacts(str(path), artifact_path=artifact_path or path.name)
    else:
        mlflow.log_artifact(str(path), artifact_path=artifact_path)


def log_weights(folder, artifact_path: str | None = None) -> None:
    """Log a saved-weights folder (safetensors + JSON config) as artifacts under its own name."""
    log_artifact(folder, artifact_path)


@_best_effort
def set_tags(tags: Mapping[str, Any]) -> None:
    if _active() is None:
        return
    import mlflow

    mlflow.set_tags({k: str(v) for k, v in tags.items()})


def evaluation_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """`metrics.json` (see ARCHITECTURE.md) -> MLflow metric names: `fpr95/<set>`, ..., `id_accuracy`."""
    metrics = {"id_accuracy": report["id_accuracy"]}
    for name, values in [*report.get("ood", {}).items(), ("average", report.get("average", {}))]:
        metrics.update({f"{k}/{name}": v for k, v in values.items() if isinstance(v, (int, float))})
    return metrics


def log_evaluation(report: Mapping[str, Any]) -> None:
    """Log `evaluate`'s report (the content of metrics.json) with the metric names compare reads."""
    log_metrics(evaluation_metrics(report))


@_best_effort
def log_classifier_model(model, example_images, name: str = "classifier", **log_model_kwargs):
    """Log a classifier as an MLflow pytorch model: `mlflow.pytorch.load_model(uri)(images)` gives logits.

    `example_images`: a batch (N > 1, so the batch dimension stays dynamic) of what the module
    takes; to serve raw images, log a module that normalises them itself. MLflow exports a CPU copy
    with torch.export ("pt2"), not pickle, so loading it back runs no stored code and needs no ncis.
    Returns MLflow's ModelInfo (its `model_uri` loads the model), or None outside a run.
    """
    if _active() is None:
        return None
    import copy

    import mlflow
    import numpy as np
    import torch
    from mlflow.models import infer_signature

    model = copy.deepcopy(model).cpu().eval()  # the caller's model keeps its device and mode
    if isinstance(example_images, torch.Tensor):
        example_images = example_images.detach().cpu().numpy()
    images = np.asarray(example_images, dtype=np.float32)
    with torch.no_grad():
        logits = model(torch.from_numpy(images)).numpy()
    # Listed, not inferred: inference reloads the model in a subprocess (slow).
    log_model_kwargs.setdefault(
        "pip_requirements", [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy"]
    )
    return mlflow.pytorch.log_model(
        model,
        name=name,
        signature=infer_signature(images, logits),
        input_example=images,
        serialization_format="pt2",
        **log_model_kwargs,
    )


# ---------------------------------------------------------------- compare


def compare(experiment: str, runs: list[str] | None = None) -> list[dict[str, Any]]:
    """Print FPR95 / AUROC / ID accuracy of the given runs, or by default of the latest finished
    `evaluate` run per parameter set, with the parameters that differ between them. Returns the rows."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    check_server(fix="or unset it to read MLflow's local default store")
    client = MlflowClient()
    found = client.get_experiment_by_name(experiment)
    if found is None:
        known = ", ".join(sorted(e.name for e in client.search_experiments())) or "none"
        raise UserError(f"no MLflow experiment {experiment!r} at {_uri()} (experiments there: {known})")
    if runs:
        chosen = []
        for run_id in runs:
            try:
                chosen.append(_with_metrics(client, client.get_run(run_id)))
            except MlflowException:
                raise UserError(f"run {run_id!r} not found at {_uri()}; copy run ids from the MLflow UI") from None
    else:
        chosen = _latest_per_param_set(client, found.experiment_id)
        if not chosen:
            raise UserError(
                f"no finished `evaluate` run in experiment {experiment!r} at {_uri()}; run `ncis run` first"
            )
    rows = _rows(chosen)
    print(_table(rows))
    return rows


def _uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def _with_metrics(client, run):
    """A pipeline parent run has no metrics itself: use its `evaluate` child."""
    if any(m in run.data.metrics for m in COMPARED_METRICS):
        return run
    children = client.search_runs(
        [run.info.experiment_id],
        f"tags.mlflow.parentRunId = '{run.info.run_id}' and tags.`{STAGE_TAG}` = 'evaluate'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return children[0] if children else run


def _latest_per_param_set(client, experiment_id: str) -> list:
    evaluate_runs = client.search_runs(
        [experiment_id],
        f"tags.`{STAGE_TAG}` = 'evaluate' and attributes.status = 'FINISHED'",
        order_by=["attributes.start_time DESC"],
    )
    latest = {}
    for run in evaluate_runs:  # newest first: the first of each parameter set wins
        key = tuple(sorted((k, v) for k, v in run.data.params.items() if k not in NOT_RESULT_PARAMS))
        latest.setdefault(key, run)
    # Best (lowest) FPR95 first; runs without it last.
    return sorted(latest.values(), key=lambda r: r.data.metrics.get("fpr95/average", float("inf")))


def _rows(runs: list) -> list[dict[str, Any]]:
    all_keys = sorted({k for run in runs for k in run.data.params})
    differing = [k for k in all_keys if len({run.data.params.get(k) for run in runs}) > 1]
    rows = []
    for run in runs:
        started = datetime.fromtimestamp(run.info.start_time / 1000).strftime("%Y-%m-%d %H:%M")
        row = {"run_id": run.info.run_id, "started": started}
        row.update({k: run.data.params.get(k, "") for k in differing})
        row.update({m: run.data.metrics.get(m) for m in COMPARED_METRICS})
        rows.append(row)
    return rows


def _table(rows: list[dict[str, Any]]) -> str:
    columns = list(rows[0])
    cells = [[("-" if v is None else f"{v:.4f}" if isinstance(v, float) else str(v)) for v in row.values()] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() for r in [columns, *cells])
