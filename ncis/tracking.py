"""MLflow tracking: one run per stage, nested under a pipeline run when the whole pipeline runs.

Stage code logs through the run in effect, `current()`: an `MlflowRun` inside `pipeline_run` /
`stage_run`, else the no-op `Run` (tracking off, or a stage called outside the CLI). Which one is
chosen once, when the run opens; the module-level `log_metrics`, `log_summary`, ... forward to it,
so a stage neither asks whether tracking is on nor holds a handle.

MLflow's own conventions throughout: `MLFLOW_TRACKING_URI` picks the server, `MLFLOW_EXPERIMENT_NAME`
the experiment (default: the benchmark's name), and a run started by `mlflow run` (which sets
`MLFLOW_RUN_ID`) becomes the pipeline run. Every run carries all parameters flattened (`cvpn.lr`),
since a stage's results depend on its upstream stages' too, the tag `ncis.stage` and provenance
tags (git commit, DVC input hashes). A stage run also lists the data it reads as MLflow datasets
(`ncis.inputs`, digest: DVC's hash) and samples system metrics. docs/tracking.md documents the names.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import hashlib
import json
import logging
import os
import re
import shlex
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from ncis.config import PLACEMENT_KEYS
from ncis.errors import UserError

STAGE_TAG = "ncis.stage"
PIPELINE = "pipeline"  # `ncis.stage` of the pipeline run
NAME_TAG = "ncis.run_name"  # the descriptive name, also on stage runs (which are named after their stage)
PRIMARY_METRIC = "auroc/average"  # greater is better
RUNS_VIEW = "ncis"  # key of the saved runs-table view that ncis keeps in every experiment it logs to
CLASSIFIER_HASH_TAG = "ncis.classifier_dvc_hash"  # DVC's hash of the classifier folder a logged model was saved from
PUBLISHED_ALIAS = "published"  # registry alias: the classifier `ncis publish` pushed (dvc.lock's)
PAPER_ALIAS = "paper"  # registry alias: the paper's released classifier `ncis import-classifier` imported last
# MLflow samples system metrics every 10 s by default, which leaves a stage of seconds without one;
# MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL, when set, wins.
SYSTEM_METRICS_INTERVAL_S = 2


def registered_model_name(benchmark: str) -> str:
    return f"ncis-{benchmark}-classifier"


# ---------------------------------------------------------------- the run in effect


class Run:
    """The no-op stand-in: every method does nothing. `MlflowRun` does the same things for real."""

    run_id: str | None = None

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        """Numeric metrics; None values (not computed) are skipped."""

    def log_summary(self, metrics: Mapping[str, Any]) -> None:
        """Metrics that describe the pipeline's result: on this run and on the pipeline run above it."""

    def log_evaluation(self, report: Mapping[str, Any]) -> None:
        """`evaluate`'s report (the content of metrics.json) under the names of `evaluation_metrics`."""
        self.log_summary(evaluation_metrics(report))

    def log_artifact(self, path, artifact_path: str | None = None) -> None:
        """A file, or a folder as a folder of the same name (unless `artifact_path` says otherwise)."""

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        pass

    def log_classifier_model(self, model, example_images, name: str = "classifier", folder=None):
        """The classifier as an MLflow pytorch model (see MlflowRun); None here."""
        return None

    def log_datasets(self, inputs: Sequence[Any]) -> None:
        """`ncis.inputs.DataInput`s as MLflow datasets, DVC's hash as digest; on the pipeline run too."""

    def register_classifier(self, benchmark: str, tags: Mapping[str, str], description: str, alias: str | None = None) -> None:
        """The classifier this run logged last, as a new version of `ncis-<benchmark>-classifier`."""


NO_RUN = Run()
_open_runs: list[Run] = []  # innermost last


def current() -> Run:
    return _open_runs[-1] if _open_runs else NO_RUN


def log_metrics(metrics: Mapping[str, Any], step: int | None = None) -> None:
    current().log_metrics(metrics, step)


def log_summary(metrics: Mapping[str, Any]) -> None:
    current().log_summary(metrics)


def log_evaluation(report: Mapping[str, Any]) -> None:
    current().log_evaluation(report)


def log_artifact(path, artifact_path: str | None = None) -> None:
    current().log_artifact(path, artifact_path)


def set_tags(tags: Mapping[str, Any]) -> None:
    current().set_tags(tags)


def log_classifier_model(model, example_images, name: str = "classifier", folder=None):
    return current().log_classifier_model(model, example_images, name, folder)


def register_classifier(benchmark: str, tags: Mapping[str, str], description: str, alias: str | None = None) -> None:
    current().register_classifier(benchmark, tags, description, alias)


def evaluation_metrics(report: Mapping[str, Any]) -> dict[str, float]:
    """metrics.json -> MLflow metric names, all of them built here: `<metric>/<set>`, `<metric>/average`,
    `<metric>/average_<group>` (metric: fpr95, auroc, aupr_in, aupr_out) and `id_accuracy`; for the
    validation OOD sets (metrics.json's "validation", if any) `<metric>/val_<set>`, `<metric>/val_average`,
    `<metric>/val_average_<group>`."""
    validation = report.get("validation") or {}
    sections = [
        *report.get("ood", {}).items(),
        ("average", report.get("average", {})),
        *((f"average_{group}", values) for group, values in report.get("groups", {}).items()),
        *((f"val_{name}", values) for name, values in validation.get("ood", {}).items()),
        ("val_average", validation.get("average", {})),
        *((f"val_average_{group}", values) for group, values in validation.get("groups", {}).items()),
    ]
    metrics = {"id_accuracy": report["id_accuracy"]}
    for section, values in sections:
        metrics.update({f"{k}/{section}": v for k, v in values.items() if isinstance(v, (int, float))})
    return metrics


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


class MlflowRun(Run):
    """An open MLflow run; `parent` is the ncis pipeline run it is nested under, if any."""

    def __init__(self, run, parent: MlflowRun | None = None):
        self.run_id = run.info.run_id
        self.experiment_id = run.info.experiment_id
        self.name = run.info.run_name
        self.parent = parent
        self.summary: dict[str, float] = {}  # what log_summary logged here
        # The classifier model logged last, here or (on the pipeline run) by a stage, and DVC's hash of its folder.
        self.classifier_uri: str | None = None
        self.classifier_hash: str | None = None

    def with_parent(self) -> tuple[MlflowRun, ...]:
        """This run, and the pipeline run it is a stage of: what a stage logs for the pipeline too."""
        return (self, self.parent) if self.parent else (self,)

    @_best_effort
    def log_metrics(self, metrics, step=None):
        import mlflow

        values = {k: float(v) for k, v in metrics.items() if v is not None}
        if values:
            mlflow.log_metrics(values, step=step, run_id=self.run_id)

    def log_summary(self, metrics):
        for run in self.with_parent():
            run.log_metrics(metrics)
            run.summary.update({k: float(v) for k, v in metrics.items() if v is not None})

    @_best_effort
    def log_artifact(self, path, artifact_path=None):
        import mlflow

        path = Path(path)
        if path.is_dir():
            mlflow.log_artifacts(str(path), artifact_path=artifact_path or path.name, run_id=self.run_id)
        else:
            mlflow.log_artifact(str(path), artifact_path=artifact_path, run_id=self.run_id)

    @_best_effort
    def set_tags(self, tags):
        from mlflow import MlflowClient
        from mlflow.entities import RunTag

        MlflowClient().log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    @_best_effort
    def log_classifier_model(self, model, example_images, name="classifier", folder=None):
        """`mlflow.pytorch.load_model(uri)(images)` gives logits. Returns MLflow's ModelInfo.

        `example_images`: a batch (N > 1, so the batch dimension stays dynamic) of what the module
        takes; to serve raw images, log a module that normalises them itself. MLflow exports a CPU
        copy with torch.export ("pt2"), not pickle, so loading it back runs no stored code and needs
        no ncis. The pipeline run registers it at its end (`_register_classifier`). `folder`: the
        classifier folder the model was saved to; its DVC hash (tag `ncis.classifier_dvc_hash`,
        also on the registered version) is how `ncis publish` finds the model of dvc.lock's classifier.
        """
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
        requirements = [f"torch=={torch.__version__.split('+')[0]}", f"mlflow=={mlflow.__version__}", "numpy"]
        info = mlflow.pytorch.log_model(
            model,
            name=name,
            signature=infer_signature(images, logits),
            input_example=images,
            serialization_format="pt2",
            pip_requirements=requirements,
        )
        digest = dvc_hashes([folder])[folder][0] if folder is not None else None
        if digest:
            self.set_tags({CLASSIFIER_HASH_TAG: digest})
        for run in self.with_parent():
            run.classifier_uri, run.classifier_hash = info.model_uri, digest
        return info

    @_best_effort
    def log_datasets(self, inputs):
        from mlflow import MlflowClient
        from mlflow.entities import DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        present = [i for i in inputs if i.path.exists()]  # a missing input: the stage itself says so
        hashes = dvc_hashes([i.path for i in present])
        logged = [
            DatasetInput(
                _dataset(i.name, i.path, *hashes[i.path]),
                [InputTag(MLFLOW_DATASET_CONTEXT, i.context), *(InputTag(k, v) for k, v in i.tags.items())],
            )
            for i in present
        ]
        if logged:
            for run in self.with_parent():
                MlflowClient().log_inputs(run.run_id, datasets=logged)

    @_best_effort
    def register_classifier(self, benchmark, tags, description, alias=None):
        if self.classifier_uri is not None:
            hashed = {CLASSIFIER_HASH_TAG: self.classifier_hash} if self.classifier_hash else {}
            _register(self.classifier_uri, benchmark, {**tags, **hashed}, description, alias)


@contextlib.contextmanager
def _in_effect(run: Run) -> Iterator[Run]:
    _open_runs.append(run)
    try:
        yield run
    finally:
        _open_runs.pop()


# ---------------------------------------------------------------- opening runs


def run_name(params, baseline=None) -> str:
    """What a run is: `<benchmark>-<outliers>-<head>-seed<seed>`, then `-<key>=<value>` for every
    parameter that differs from `baseline` (the params file as written); under `dvc exp run`, the
    DVC experiment's name. Safe as a git ref, so it can be a DVC experiment name too."""
    if os.environ.get("DVC_EXP_NAME"):
        return os.environ["DVC_EXP_NAME"]
    outliers = params.sample.method if params.classifier.outliers == "ncis" else params.classifier.outliers
    parts = [params.benchmark, outliers, params.classifier.energy_head, f"seed{params.seed}"]
    if baseline is not None:
        named = {"benchmark", "seed", "sample.method", "classifier.outliers", "classifier.energy_head"}
        written = baseline.flat()
        parts += [
            f"{key}={value}"
            for key, value in params.flat().items()
            if key not in named | PLACEMENT_KEYS and value != written.get(key)
        ]
    return _ref_safe(parts)


def _ref_safe(parts: list[str], limit: int = 120) -> str:
    """Only characters git allows in a ref (DVC experiment names are refs); a hash keeps long names apart."""
    name = "-".join(re.sub(r"[^A-Za-z0-9._=+,-]+", "_", part).strip("_") for part in parts)
    name = re.sub(r"\.{2,}", ".", name).strip("._-")
    if len(name) > limit:
        name = f"{name[: limit - 9]}-{hashlib.sha1('-'.join(parts).encode()).hexdigest()[:8]}"
    return name


def pipeline_run(params, name: str | None = None) -> contextlib.AbstractContextManager[Run]:
    """The run of a whole pipeline: the `mlflow run` project run if there is one, else a new run
    named `name` (default: `run_name(params)`). At its end it registers the classifier."""
    return _open_run(params, None, name)


def stage_run(params, stage: str, name: str | None = None) -> contextlib.AbstractContextManager[Run]:
    """The run of one stage: named after the stage under a pipeline run (or the `mlflow run` project
    run), `<name>/<stage>` at the top level (a stage run on its own, e.g. by `dvc repro`)."""
    return _open_run(params, stage, name)


@contextlib.contextmanager
def _open_run(params, stage: str | None, name: str | None) -> Iterator[Run]:
    if not params.tracking.enabled:
        with _in_effect(NO_RUN):
            yield NO_RUN
        return
    import mlflow

    check_server()
    name = name or run_name(params)
    parent = current() if isinstance(current(), MlflowRun) else None
    if parent is None and stage is not None and os.environ.get("MLFLOW_RUN_ID"):
        # `mlflow run -e <stage>`: the project run holds the -P parameters as given; the stage
        # run below it looks exactly like one under `ncis run`, whatever the front door.
        with _open_run(params, None, name), _open_run(params, stage, name) as run:
            yield run
        return
    if parent is not None or mlflow.active_run() is not None:  # ours, or e.g. a notebook's own
        start = {"run_name": stage or name, "nested": True, "experiment_id": mlflow.active_run().info.experiment_id}
    elif os.environ.get("MLFLOW_RUN_ID"):
        # Resume the run `mlflow run` created; it keeps its name (`mlflow run --run-name`). Popped
        # from the environment: `mlflow.start_run` would otherwise resume it in place of every nested run.
        start = {"run_id": os.environ.pop("MLFLOW_RUN_ID")}
    else:
        experiment = os.environ.get("MLFLOW_EXPERIMENT_NAME") or params.benchmark
        start = {"run_name": f"{name}/{stage}" if stage else name, "experiment_id": _experiment_id(experiment)}
    tags = {STAGE_TAG: stage or PIPELINE, NAME_TAG: name, **_provenance_tags(stage)}
    with _running(params, tags, log_system_metrics=_system_metrics(stage), **start) as started, _in_effect(
        MlflowRun(started, parent)
    ) as run:
        if parent is None:
            _prepare_experiment(run.experiment_id)
        if stage is not None:
            from ncis.inputs import stage_inputs

            run.log_datasets(stage_inputs(stage, params))
        yield run
        if stage is None:
            _best_effort(_register_classifier)(run, params.benchmark)
        if parent is None:
            _best_effort(_print_link)(run)


@contextlib.contextmanager
def _running(params, tags: dict[str, str], **start_kwargs) -> Iterator[Any]:
    """Start (or resume) a run with all params and `tags`; FAILED if the body raises, KILLED on Ctrl-C."""
    import mlflow
    from mlflow.entities import RunStatus

    with _system_metrics_interval():
        run = mlflow.start_run(**start_kwargs)
    _logging_lost.clear()
    status = RunStatus.FAILED
    try:
        mlflow.set_tags(tags)
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


def _system_metrics(stage: str | None) -> bool | None:
    """Stage runs log MLflow's system metrics (`system/cpu_utilization_percentage`, memory, disk,
    network, and per GPU with nvidia-ml-py installed) unless MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING
    says otherwise (None: MLflow reads it). The pipeline run's stages hold its share."""
    from mlflow.environment_variables import MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING

    return None if stage is None or MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING.defined else True


@contextlib.contextmanager
def _system_metrics_interval() -> Iterator[None]:
    """SYSTEM_METRICS_INTERVAL_S while MLflow's monitor reads its settings (at the run's start),
    unless MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL is set. The monitor's own log lines (started,
    stopped, a server lost) are left out: ncis's one warning line says what matters."""
    logging.getLogger("mlflow.system_metrics").setLevel(logging.ERROR)
    key = "MLFLOW_SYSTEM_METRICS_SAMPLING_INTERVAL"
    ours = key not in os.environ
    if ours:
        os.environ[key] = str(SYSTEM_METRICS_INTERVAL_S)
    try:
        yield
    finally:
        if ours:
            os.environ.pop(key, None)


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


# ---------------------------------------------------------------- the experiment and the model registry


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


def _prepare_experiment(experiment_id: str) -> None:
    """Declare a model-training experiment with average AUROC as its primary metric, and keep the
    `ncis` runs-table view (docs/tracking.md). The kind is left alone if someone chose another."""
    from mlflow import MlflowClient
    from mlflow.utils.mlflow_tags import (
        MLFLOW_EXPERIMENT_PRIMARY_METRIC_GREATER_IS_BETTER,
        MLFLOW_EXPERIMENT_PRIMARY_METRIC_NAME,
    )

    client = MlflowClient()
    wanted = {
        "mlflow.experimentKind": "custom_model_development",  # the UI's own value for model training
        MLFLOW_EXPERIMENT_PRIMARY_METRIC_NAME: PRIMARY_METRIC,
        MLFLOW_EXPERIMENT_PRIMARY_METRIC_GREATER_IS_BETTER: "true",
        f"mlflow.sharedViewState.{RUNS_VIEW}": _runs_view(),
    }
    have = client.get_experiment(experiment_id).tags
    for key, value in wanted.items():
        if key not in have or (key != "mlflow.experimentKind" and _differs(have[key], value)):
            client.set_experiment_tag(experiment_id, key, value)


def _differs(old: str, new: str) -> bool:
    """Tag values; saved views by content, their timestamps aside."""
    with contextlib.suppress(ValueError, TypeError, KeyError):
        old_view, new_view = json.loads(old), json.loads(new)
        return (old_view["name"], old_view["state"]) != (new_view["name"], new_view["state"])
    return old != new


def _runs_view() -> str:
    """The MLflow UI's saved view (Runs > Views > "ncis pipelines"), as the UI stores one in an
    experiment tag: top-level runs (pipelines; stage runs of their own) sorted by average AUROC,
    with the datasets they read and the final metrics as columns. The UI nests stage runs only
    when sorted by start time."""
    columns = ["auroc/average", "fpr95/average", "aupr_in/average", "id_accuracy", "synthesize/outlier_in_class_fraction"]
    state = {
        "searchFilter": "tags.mlflow.parentRunId IS NULL",
        "orderByKey": f"metrics.`{PRIMARY_METRIC}`",
        "orderByAsc": False,
        "selectedColumns": ["attributes.`Dataset`", *(f"metrics.`{c}`" for c in columns)],
        "columnOrder": ["attributes.`Run Name`"],  # the UI sizes only columns it is given an order for
        "columnWidths": {"attributes.`Run Name`": 340},
    }
    now = int(time.time() * 1000)
    return json.dumps({"name": "ncis pipelines", "createdAt": now, "updatedAt": now, "state": json.dumps(state)})


def runs_table_url(experiment_id: str, server: str | None = None) -> str | None:
    """The experiment's runs table with the `ncis` view, on the "Model training" side of the UI, on
    `server` (default: the tracking server; None for a local store, which `ncis ui` serves)."""
    import mlflow

    uri = (server or mlflow.get_tracking_uri()).rstrip("/")
    if not uri.startswith(("http://", "https://")):
        return None
    return f"{uri}/#/experiments/{experiment_id}/runs?viewStateShareKey={RUNS_VIEW}&workflowType=machine_learning"


def _register_classifier(run: MlflowRun, benchmark: str) -> None:
    """A new version of `ncis-<benchmark>-classifier` for a pipeline that logged and evaluated a
    classifier, with the pipeline's results as tags and description."""
    if run.classifier_uri is None or PRIMARY_METRIC not in run.summary:
        return
    results = {k: f"{v:.6g}" for k, v in run.summary.items()}
    run.register_classifier(benchmark, {NAME_TAG: run.name, "ncis.pipeline_run_id": run.run_id, **results}, _version_description(run))


def _register(model_uri: str, benchmark: str, tags: Mapping[str, str], description: str, alias: str | None = None):
    """A new version of `ncis-<benchmark>-classifier` pointing at `model_uri` (registering copies no
    model and loads none), `alias` moved onto it; the version, or None with a note on stderr."""
    import mlflow
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    name = registered_model_name(benchmark)
    try:
        version = mlflow.register_model(model_uri, name, tags=dict(tags))
        MlflowClient().update_model_version(name, version.version, description=description)
        if alias:
            MlflowClient().set_registered_model_alias(name, alias, version.version)
    except MlflowException as err:  # e.g. a store without a registry: the run itself is complete
        print(f"ncis: note: classifier not registered as {name!r}: {str(err).splitlines()[0]}", file=sys.stderr)
        return None
    print(f"ncis: classifier registered as models:/{name}/{version.version}" + (f" (models:/{name}@{alias})" if alias else ""))
    return version


def alias_classifier(benchmark: str, classifier_hash: str, alias: str = PUBLISHED_ALIAS) -> str | None:
    """Point `alias` of `ncis-<benchmark>-classifier` at the version of the classifier whose folder
    has DVC hash `classifier_hash`: the newest such version, else a new one made from the model the
    newest run that saved that folder logged. Returns `models:/<name>@<alias>`, or None when no run
    in this tracking store logged that classifier."""
    from mlflow import MlflowClient

    name = registered_model_name(benchmark)
    tagged = f"tags.`{CLASSIFIER_HASH_TAG}` = '{classifier_hash}'"
    versions = MlflowClient().search_model_versions(f"name = '{name}' and {tagged}", order_by=["version_number DESC"], max_results=1)
    version = versions[0] if versions else _register_logged(benchmark, classifier_hash, tagged)
    if version is None:
        return None
    MlflowClient().set_registered_model_alias(name, alias, version.version)
    return f"models:/{name}@{alias}"


def _register_logged(benchmark: str, classifier_hash: str, tagged: str):
    """A version of the model that the newest run matching `tagged` logged (a `train-classifier`
    run of `dvc repro`, which registers nothing itself); None if no run did."""
    import mlflow

    runs = mlflow.search_runs(search_all_experiments=True, filter_string=tagged, order_by=["attributes.start_time DESC"], output_format="list")
    for run in runs:
        for output in run.outputs.model_outputs if run.outputs else []:
            tags = {NAME_TAG: run.info.run_name, CLASSIFIER_HASH_TAG: classifier_hash}
            return _register(f"models:/{output.model_id}", benchmark, tags, f"{run.info.run_name}: dvc.lock's classifier (run {run.info.run_id})")
    return None


def _version_description(run: MlflowRun) -> str:
    metrics = run.summary
    shown = [("AUROC", "auroc/average"), ("FPR95", "fpr95/average"), ("ID accuracy", "id_accuracy")]
    results = ", ".join(f"{label} {100 * metrics[key]:.1f}%" for label, key in shown if key in metrics)
    return f"{run.name}: {results} (pipeline run {run.run_id})"


def _print_link(run: MlflowRun) -> None:
    """The runs table's link on a tracking server; on a local store, the command that serves it."""
    from mlflow import MlflowClient

    url = runs_table_url(run.experiment_id)
    if url is None:
        url = f"run `ncis ui --experiment {shlex.quote(MlflowClient().get_experiment(run.experiment_id).name)}`"
    print(f"ncis: runs table (sorted by average AUROC): {url}")


# ---------------------------------------------------------------- provenance tags


def _provenance_tags(stage: str | None) -> dict[str, str]:
    tags = dict(_git_tags(os.getcwd()))  # a copy: the cached dict is shared
    if os.environ.get("DVC_EXP_NAME"):
        tags["dvc.exp_name"] = os.environ["DVC_EXP_NAME"]
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
    stages = _locked_stages(lock_file)
    produced = dvc_output_hashes(lock_file)
    hashes = {}
    for dep in (stages.get(stage) or {}).get("deps") or []:
        digest = produced.get(dep["path"]) or _dvc_hash(dep)
        if digest:
            hashes[dep["path"]] = digest
    return hashes


def dvc_output_hashes(lock_file: str | Path = "dvc.lock") -> dict[str, str]:
    """Output path -> DVC hash of every stage's outputs, from `dvc.lock`; {} where unknown."""
    stages = _locked_stages(lock_file)
    return {out["path"]: _dvc_hash(out) for entry in stages.values() for out in entry.get("outs") or []}


def _locked_stages(lock_file: str | Path) -> dict[str, Any]:
    import yaml

    try:
        return (yaml.safe_load(Path(lock_file).read_text()) or {}).get("stages") or {}
    except (OSError, yaml.YAMLError, AttributeError):
        return {}


def _dvc_hash(entry: Mapping[str, Any]) -> str | None:
    return entry.get("md5") or entry.get("etag") or entry.get("checksum")


def dvc_hashes(paths: Sequence[Path]) -> dict[Path, tuple[str, int | None, int | None]]:
    """path -> (DVC's hash, bytes, files) of each file or folder: what `dvc add` and dvc.lock record
    (`<md5>` for a file, `<md5>.dir` for a folder), computed by DVC itself whether or not DVC tracks
    the path, so it is equal to dvc.lock's where dvc.lock is current and tells changed data apart
    where it is not. Inside a DVC repository its state cache spares re-reading files unchanged since
    DVC last hashed them."""
    from dvc.exceptions import NotDvcRepoError
    from dvc.repo import Repo
    from dvc_data.hashfile.build import build
    from dvc_data.hashfile.db import HashFileDB
    from dvc_objects.fs.local import LocalFileSystem

    if not paths:
        return {}
    with contextlib.ExitStack() as stack:
        try:
            repo = stack.enter_context(Repo())
            odb, fs, ignore = repo.cache.local, repo.fs, repo.dvcignore
        except NotDvcRepoError:
            fs, ignore = LocalFileSystem(), None
            odb = HashFileDB(fs, stack.enter_context(tempfile.TemporaryDirectory(prefix="ncis-hash-")))
        hashes = {}
        for path in paths:
            _, meta, obj = build(odb, str(Path(path).resolve()), fs, "md5", dry_run=True, ignore=ignore)
            hashes[path] = (obj.hash_info.value, meta.size, meta.nfiles if meta.isdir else 1)
        return hashes


def _dataset(name: str, path: Path, digest: str, size: int | None, files: int | None):
    """An MLflow dataset entity: a local source with DVC's hash as digest and its size as profile."""
    from mlflow.data.meta_dataset import MetaDataset
    from mlflow.data.sources import LocalArtifactDatasetSource
    from mlflow.entities import Dataset

    described = MetaDataset(LocalArtifactDatasetSource(str(Path(path).resolve())), name=name, digest=digest).to_dict()
    return Dataset(**described, profile=json.dumps({"files": files, "bytes": size}))


# ---------------------------------------------------------------- the store


def missing_local_store() -> Path | None:
    """The local SQLite file MLflow would use (MLFLOW_TRACKING_URI, else its default) when it does
    not exist yet: only reading from it would create an empty one."""
    import mlflow

    uri = mlflow.get_tracking_uri()
    database = uri.removeprefix("sqlite:///")
    return Path(database) if database != uri and not Path(database).is_file() else None


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
