"""MLflow layer against a real `mlflow server` (conftest.py): runs, nesting, names, params, metrics on
the stage and the pipeline run, artifacts, the model registry, `compare`, `mlflow run`, and the
failure paths (failed stage, Ctrl-C, unreachable server, tracking off).

The pipeline's stages are replaced by tiny fakes through `ncis.pipeline.stage_function`, except
where per-epoch metrics of the real train-cvpn and train-classifier are checked.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import html
import io
import json
import os
import re
import shlex
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import tomllib
import types
import uuid
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
import yaml
from mlflow import MlflowClient

from ncis import compare as compare_module
from ncis import pipeline, publish, tracking
from ncis.cli import main, parse_args
from ncis.config import load_params
from ncis.datasets import get_benchmark, write_image_folder
from ncis.errors import UserError
from ncis.inputs import GROUP_TAG, stage_inputs
from ncis.io import save_arrays
from ncis.layout import Layout, layout_for
from ncis.pipeline import STAGES
from conftest import free_port
from faults import Child, child_env

REPO = Path(__file__).resolve().parents[1]
REPORT = {  # metrics.json as evaluate writes it
    "benchmark": "digits",
    "score": "energy",
    "id_accuracy": 0.973,
    "ood": {
        "letters": {"group": "near", "fpr95": 0.41, "auroc": 0.91, "aupr_in": 0.93, "aupr_out": 0.87},
        "photos": {"group": "far", "fpr95": 0.05, "auroc": 0.99, "aupr_in": 0.99, "aupr_out": 0.98},
    },
    "average": {"fpr95": 0.23, "auroc": 0.95, "aupr_in": 0.96, "aupr_out": 0.925},
    "groups": {
        "near": {"fpr95": 0.41, "auroc": 0.91, "aupr_in": 0.93, "aupr_out": 0.87},
        "far": {"fpr95": 0.05, "auroc": 0.99, "aupr_in": 0.99, "aupr_out": 0.98},
    },
}
DIAGNOSTICS = {"synthesize/outlier_in_class_fraction": 0.7, "synthesize/outlier_diversity": 0.12}


def make_params(outputs: Path, *overrides: str):
    return load_params(REPO / "params.yaml", [f"outputs={outputs}", *overrides])


def tiny_classifier(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10)
    )


@pytest.fixture
def experiment(tracking_uri, monkeypatch) -> str:
    """A fresh MLflow experiment for this test (MLflow's own MLFLOW_EXPERIMENT_NAME), on the session's server."""
    name = f"digits-test-{uuid.uuid4().hex[:8]}"
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", name)
    return name


@pytest.fixture
def fake_stages(monkeypatch):
    """Replace every stage by a fake that logs through ncis.tracking as the real one does: a metric
    and an artifact folder; synthesize its diagnostics; train-classifier a tiny model; evaluate the
    `report` knob. Returns the list of stages called and the `fail` / `report` knobs."""
    calls: list[str] = []
    knobs = {"fail": None, "report": REPORT}

    def stage_function(name):
        def main(params):
            calls.append(name)
            if name == knobs["fail"]:
                raise knobs.get("error", RuntimeError(f"{name} broke"))
            tracking.log_metrics({f"{name}/done": 1, "not_computed": None}, step=0)
            folder = Path(params.outputs) / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text("{}")
            tracking.log_artifact(folder)
            if name == "synthesize":
                tracking.log_summary({**DIAGNOSTICS, "synthesize/not_computed": None})
            if name == "train-classifier":
                tracking.log_classifier_model(tiny_classifier(), torch.rand(4, 1, 8, 8))
            if name == "evaluate":
                tracking.log_evaluation(knobs["report"])

        return main

    monkeypatch.setattr(pipeline, "stage_function", stage_function)
    return calls, knobs


def write_stage_inputs(outputs: Path, seed: int = 0) -> Layout:
    """Every file and folder the stages read (ncis.inputs), tiny, as if earlier stages had written them;
    every OOD set of the benchmark registry. Another seed writes other data."""
    layout, benchmark = Layout(Path(outputs)), get_benchmark("digits")
    rng = np.random.default_rng(seed)

    def images(folder: Path, count: int, classes: int = 1) -> None:
        write_image_folder(folder, rng.integers(0, 256, (count, 8, 8, 1), dtype=np.uint8), np.arange(count) % classes)

    for folder in (layout.id_train, layout.id_test, layout.synthetic_images):
        images(folder, 20, classes=10)
    for name in benchmark.ood_sets:
        images(layout.ood(name), 3)
    for name in benchmark.validation_ood_sets:
        images(layout.ood_val(name), 3)
    save_arrays(layout.embeddings, embeddings=rng.normal(size=(20, 4)).astype(np.float32), labels=np.arange(20) % 10)
    save_arrays(layout.outliers, outliers=rng.normal(size=(10, 2, 4)).astype(np.float32))
    return layout


def dvc_md5(path: Path) -> str:
    """DVC's hash as `dvc add` and dvc.lock record it, recomputed here without DVC: the md5 of a file;
    of a folder, the md5 of the sorted JSON list of its files' md5 and relative path, then ".dir"."""
    if path.is_file():
        return hashlib.md5(path.read_bytes()).hexdigest()
    entries = sorted(
        ({"md5": hashlib.md5(f.read_bytes()).hexdigest(), "relpath": f.relative_to(path).as_posix()} for f in path.rglob("*") if f.is_file()),
        key=lambda entry: entry["relpath"],
    )
    return hashlib.md5(json.dumps(entries, sort_keys=True).encode()).hexdigest() + ".dir"


def datasets_of(run) -> dict[str, tuple[str, dict[str, str]]]:
    """Dataset name -> (digest, input tags) of a run's inputs."""
    return {d.dataset.name: (d.dataset.digest, {t.key: t.value for t in d.tags}) for d in run.inputs.dataset_inputs}


@pytest.fixture
def local_store(tmp_path, monkeypatch) -> Path:
    """MLflow's local default store in a fresh folder, made the working directory (no server)."""
    monkeypatch.chdir(tmp_path)
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    assert mlflow.get_tracking_uri() == f"sqlite:///{tmp_path / 'mlflow.db'}"
    return tmp_path


def pipeline_runs(experiment: str, outputs: Path):
    """(pipeline run, its stage runs in start order) of the pipeline that wrote to `outputs`."""
    found = mlflow.search_runs(
        experiment_names=[experiment],
        filter_string=f"params.outputs = '{outputs}'",
        order_by=["attributes.start_time ASC"],
        output_format="list",
    )
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], children


# ---------------------------------------------------------------- runs, metrics, tags


@pytest.mark.slow
def test_pipeline_nests_stage_runs_with_params_metrics_artifacts_and_tags(experiment, fake_stages, tmp_path, monkeypatch):
    calls, _ = fake_stages
    monkeypatch.chdir(tmp_path)  # not a git checkout (tolerated), with a dvc.lock
    lock = {
        "schema": "2.0",
        "stages": {
            "prepare": {"outs": [{"path": "outputs/data", "md5": "fresh.dir"}]},
            "embed": {"deps": [{"path": "outputs/data", "md5": "stale.dir"}, {"path": "ncis/embed.py", "md5": "abc"}]},
        },
    }
    (tmp_path / "dvc.lock").write_text(yaml.safe_dump(lock))
    params = make_params(tmp_path / "out", "cvpn.lr=0.003")

    pipeline.run_pipeline(params)

    assert calls == list(STAGES)
    parent, children = pipeline_runs(experiment, params.outputs)
    expected_params = {k: str(v) for k, v in params.flat().items()}
    assert parent.info.run_name == "digits-cvpn-monotone-seed0" and parent.info.status == "FINISHED"
    assert parent.data.tags["ncis.stage"] == "pipeline" and parent.data.tags["ncis.run_name"] == "digits-cvpn-monotone-seed0"
    assert parent.data.params == expected_params
    assert [c.info.run_name for c in children] == list(STAGES)
    client = MlflowClient()
    for child in children:
        stage = child.info.run_name
        assert child.info.status == "FINISHED"
        assert child.data.tags["ncis.stage"] == stage and child.data.tags["ncis.run_name"] == parent.info.run_name
        assert child.data.params == expected_params
        assert child.data.metrics[f"{stage}/done"] == 1.0
        assert "not_computed" not in child.data.metrics
        assert [a.path for a in client.list_artifacts(child.info.run_id, stage)] == [f"{stage}/config.json"]
        assert "ncis.git_dirty" not in child.data.tags
    evaluate = children[-1].data.metrics
    assert evaluate["fpr95/letters"] == 0.41 and evaluate["aupr_out/photos"] == 0.98
    assert evaluate["fpr95/average"] == 0.23 and evaluate["auroc/average"] == 0.95 and evaluate["aupr_out/average"] == 0.925
    assert evaluate["auroc/average_near"] == 0.91 and evaluate["fpr95/average_far"] == 0.05
    assert evaluate["id_accuracy"] == 0.973
    # The pipeline run carries the final metrics and the outlier diagnostics, not the stages' own.
    synthesize = children[list(STAGES).index("synthesize")].data.metrics
    assert {k: v for k, v in synthesize.items() if k != "synthesize/done"} == DIAGNOSTICS
    assert parent.data.metrics == {**{k: v for k, v in evaluate.items() if "/done" not in k}, **DIAGNOSTICS}
    embed_tags = children[1].data.tags
    assert embed_tags["dvc.dep.outputs/data"] == "fresh.dir"  # the producer's out, not embed's stale dep
    assert embed_tags["dvc.dep.ncis/embed.py"] == "abc"


@pytest.mark.slow
def test_experiment_opens_as_model_training_with_auroc_as_primary_metric(experiment, fake_stages, tmp_path, capsys):
    pipeline.run_pipeline(make_params(tmp_path / "out"))

    found = mlflow.get_experiment_by_name(experiment)
    assert experiment != "digits"  # MLFLOW_EXPERIMENT_NAME wins over the benchmark name
    tags = found.tags
    assert tags["mlflow.experimentKind"] == "custom_model_development"
    assert tags["mlflow.experiment.primaryMetric.name"] == "auroc/average"
    assert tags["mlflow.experiment.primaryMetric.greaterIsBetter"] == "true"
    view = json.loads(tags["mlflow.sharedViewState.ncis"])
    state = json.loads(view["state"])
    assert state["orderByKey"] == "metrics.`auroc/average`" and state["orderByAsc"] is False
    assert "metrics.`fpr95/average`" in state["selectedColumns"]
    url = f"{mlflow.get_tracking_uri()}/#/experiments/{found.experiment_id}/runs?viewStateShareKey=ncis&workflowType=machine_learning"
    assert url in capsys.readouterr().out
    # `ncis ui` on a tracking server starts nothing: it prints the same link.
    assert main(["ui", "--no-browser"]) == 0
    assert capsys.readouterr().out == f"ui: runs table (sorted by average AUROC): {url}\n"


@pytest.mark.slow
def test_a_kind_chosen_by_the_user_is_kept(experiment, fake_stages, tmp_path):
    MlflowClient().create_experiment(experiment, tags={"mlflow.experimentKind": "genai_development"})
    pipeline.run_stage("sample", make_params(tmp_path / "out"))
    assert mlflow.get_experiment_by_name(experiment).tags["mlflow.experimentKind"] == "genai_development"


@pytest.mark.slow
def test_failed_stage_marks_its_runs_failed_and_reraises(experiment, fake_stages, tmp_path):
    calls, knobs = fake_stages
    knobs["fail"] = "sample"
    params = make_params(tmp_path / "out")

    with pytest.raises(RuntimeError, match="sample broke"):
        pipeline.run_pipeline(params)

    assert calls == ["prepare", "embed", "train-cvpn", "sample"]
    parent, children = pipeline_runs(experiment, params.outputs)
    assert parent.info.status == "FAILED"
    assert [(c.info.run_name, c.info.status) for c in children] == [
        ("prepare", "FINISHED"), ("embed", "FINISHED"), ("train-cvpn", "FINISHED"), ("sample", "FAILED")
    ]
    assert tracking.current() is tracking.NO_RUN  # nothing left open


@pytest.mark.slow
def test_ctrl_c_marks_the_stage_and_pipeline_runs_killed(experiment, fake_stages, tmp_path, monkeypatch, capsys):
    calls, knobs = fake_stages
    knobs["fail"], knobs["error"] = "train-cvpn", KeyboardInterrupt()
    outputs = tmp_path / "out"

    assert main(["run", "--set", f"outputs={outputs}"]) == 130  # the CLI's answer to Ctrl-C

    assert "ncis: stopped by SIGINT during stage train-cvpn" in capsys.readouterr().err
    parent, children = pipeline_runs(experiment, str(outputs))
    assert parent.info.status == "KILLED"
    assert [(c.info.run_name, c.info.status) for c in children][-1] == ("train-cvpn", "KILLED")
    assert mlflow.active_run() is None


@pytest.mark.slow
def test_classifier_is_registered_per_pipeline_with_its_metrics(experiment, fake_stages, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    params = make_params(tmp_path / "out", "seed=3")
    pipeline.run_pipeline(params, run_name="digits-cvpn-free-seed3-try")
    parent, children = pipeline_runs(experiment, params.outputs)
    train = next(c for c in children if c.info.run_name == "train-classifier")
    client = MlflowClient()

    (version,) = client.search_model_versions(f"name = 'ncis-digits-classifier' and run_id = '{train.info.run_id}'")
    assert version.tags["ncis.run_name"] == "digits-cvpn-free-seed3-try"
    assert version.tags["ncis.pipeline_run_id"] == parent.info.run_id
    assert float(version.tags["auroc/average"]) == 0.95 and float(version.tags["id_accuracy"]) == 0.973
    assert version.description.startswith("digits-cvpn-free-seed3-try: AUROC 95.0%, FPR95 23.0%, ID accuracy 97.3%")

    # Loads back without ncis and without unpickling (torch.export), from the registry's URI.
    loaded = mlflow.pytorch.load_model(f"models:/ncis-digits-classifier/{version.version}")
    images = torch.rand(3, 1, 8, 8)  # another batch size than the example's
    torch.testing.assert_close(loaded(images), tiny_classifier()(images))
    assert train.data.tags["mlflow.source.git.commit"] == _git_head()
    assert train.data.tags["ncis.git_dirty"] in ("true", "false")

    # A second pipeline is a new version.
    pipeline.run_pipeline(make_params(tmp_path / "again", "seed=3"))
    versions = client.search_model_versions("name = 'ncis-digits-classifier'")
    assert max(int(v.version) for v in versions) > int(version.version)


@pytest.mark.slow
def test_a_pipeline_without_evaluation_registers_nothing(experiment, fake_stages, tmp_path):
    _, knobs = fake_stages
    knobs["fail"] = "evaluate"
    params = make_params(tmp_path / "out")
    with pytest.raises(RuntimeError):
        pipeline.run_pipeline(params)
    _, children = pipeline_runs(experiment, params.outputs)
    train = next(c for c in children if c.info.run_name == "train-classifier")
    assert MlflowClient().search_model_versions(f"run_id = '{train.info.run_id}'") == []


def _git_head() -> str | None:
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO)
    return head.stdout.strip() if head.returncode == 0 else None


# ---------------------------------------------------------------- per-epoch metrics of the real stages


@pytest.mark.slow
def test_real_training_stages_log_every_epoch_to_the_server(experiment, tmp_path):
    outputs = tmp_path / "out"
    params = load_params(
        REPO / "params.yaml",
        [
            f"outputs={outputs}", "device=cpu", "cvpn.epochs=3", "cvpn.hidden=16", "cvpn.batch_size=32",
            "classifier.arch=small_cnn", "classifier.outliers=none", "classifier.epochs=2", "classifier.batch_size=8",
        ]
    )
    layout = layout_for(params)
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(10), 12)
    embeddings = rng.normal(size=(120, 8)) + 5 * rng.normal(size=(10, 8))[labels]
    save_arrays(layout.embeddings, embeddings=embeddings.astype(np.float32), labels=labels)
    images = (rng.random((40, 8, 8, 1)) * 64 + np.repeat(np.arange(10), 4)[:, None, None, None] * 19).astype(np.uint8)
    write_image_folder(layout.id_train, images, np.repeat(np.arange(10), 4))

    cvpn = pipeline.run_stage("train-cvpn", params, "epochs")
    classifier = pipeline.run_stage("train-classifier", params, "epochs")

    client = MlflowClient()
    runs = {r.data.tags["ncis.stage"]: r for r in mlflow.search_runs(experiment_names=[experiment], output_format="list")}
    assert runs["train-cvpn"].info.run_name == "epochs/train-cvpn"  # a stage run of its own
    history = client.get_metric_history(runs["train-cvpn"].info.run_id, "invariant_loss")
    assert [m.step for m in history] == [1, 2, 3]
    assert all(np.isfinite(m.value) for m in history)
    selected = client.get_metric_history(runs["train-cvpn"].info.run_id, f"{cvpn['selected_on']}_invariant_mse")
    assert min(m.value for m in selected) == pytest.approx(cvpn["best_holdout_invariant_mse"])
    assert runs["train-cvpn"].data.metrics["num_invariants"] == cvpn["num_invariants"]

    history = client.get_metric_history(runs["train-classifier"].info.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2]
    assert history[-1].value == pytest.approx(classifier["train_stats"]["train/loss"])
    accuracy = client.get_metric_history(runs["train-classifier"].info.run_id, "train/accuracy")
    assert accuracy[-1].value == pytest.approx(classifier["train_stats"]["train/accuracy"])


# ---------------------------------------------------------------- datasets, system metrics, registry aliases


@pytest.mark.parametrize("overrides", [[], ["evaluate.score=knn", "classifier.outliers=none"]])
def test_stage_inputs_come_from_the_layout_and_the_benchmark_registry_and_are_dvc_deps(overrides):
    params = make_params(Path("outputs"), *overrides)  # dvc.yaml's ${outputs}
    benchmark = get_benchmark("digits")
    names = {stage: [i.name for i in stage_inputs(stage, params)] for stage in STAGES}
    assert names["prepare"] == names["pretrain-classifier"] == []  # digits: pretrain.epochs 0, no phase 1
    assert names["embed"] == ["data/train"]
    assert names["train-cvpn"] == names["sample"] == ["embed/embeddings.npz"]
    assert names["synthesize"] == ["sample/outliers.npz", "embed/embeddings.npz", "data/train"]
    assert names["train-classifier"] == ["data/train", *([] if overrides else ["synthesize/images"])]
    ood = [f"data/ood/{name}" for name in benchmark.ood_sets]
    validation = [f"data/ood_val/{name}" for name in benchmark.validation_ood_sets]
    assert ood and validation
    assert names["evaluate"] == [*(["data/train"] if overrides else []), "data/test", *ood, *validation]  # knn fits on data/train
    uses = {i.name: (i.context, i.tags) for i in stage_inputs("evaluate", params)}
    assert uses["data/test"] == ("testing", {})
    for name, group in benchmark.ood_sets.items():
        assert uses[f"data/ood/{name}"] == ("testing", {GROUP_TAG: group})
    for name, group in benchmark.validation_ood_sets.items():
        assert uses[f"data/ood_val/{name}"] == ("validation", {GROUP_TAG: group})
    # Each input is one of the stage's DVC deps, or inside one.
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    for stage in STAGES:
        deps = [(next(iter(d)) if isinstance(d, dict) else d).replace("${outputs}", "outputs") for d in stages[stage]["deps"]]
        for data in stage_inputs(stage, params):
            assert any(data.path.as_posix() == d or data.path.as_posix().startswith(d + "/") for d in deps), (stage, data.name, deps)


@pytest.mark.slow
def test_every_stage_run_lists_the_data_it_read_with_dvc_hashes_and_other_data_is_told_apart(local_store, fake_stages):
    """Two pipelines on a local store, on the same data but for one OOD set: each stage run's
    datasets are what ncis.inputs names, with the hash DVC records (recomputed here) as digest;
    the pipeline run lists them all; only the changed set's digest differs between the two."""
    first, second = write_stage_inputs(local_store / "a"), write_stage_inputs(local_store / "b")
    changed = list(get_benchmark("digits").ood_sets)[-1]
    shutil.rmtree(second.ood(changed))
    write_image_folder(second.ood(changed), np.zeros((3, 8, 8, 1), np.uint8), np.zeros(3))
    listed = {}
    for layout in (first, second):
        params = make_params(layout.root)
        pipeline.run_pipeline(params, f"run-{layout.root.name}")
        parent, children = pipeline_runs("digits", params.outputs)
        union: dict = {}
        for child in children:
            expected = {
                i.name: (dvc_md5(i.path), {"mlflow.data.context": i.context, **i.tags}) for i in stage_inputs(child.info.run_name, params)
            }
            assert datasets_of(child) == expected, child.info.run_name
            union = {**expected, **union}  # a dataset's first use, as the pipeline run keeps it
        assert datasets_of(parent) == union and len(union) > 5
        listed[layout.root.name] = {name: digest for name, (digest, _) in union.items()}
    a, b = listed["a"], listed["b"]
    assert [name for name in a if a[name] != b[name]] == [f"data/ood/{changed}"]
    (profile,) = [json.loads(d.dataset.profile) for d in parent.inputs.dataset_inputs if d.dataset.name == f"data/ood/{changed}"]
    assert profile == {"files": 3, "bytes": sum(f.stat().st_size for f in second.ood(changed).rglob("*.png"))}


class FakeNvml(types.SimpleNamespace):
    """What MLflow's GPU monitor calls of NVIDIA's NVML bindings (pynvml): one GPU, 6 of 8 GB used, 42% busy."""

    class NVMLError(Exception):
        pass

    def __init__(self):
        super().__init__(
            nvmlInit=lambda: None, nvmlDeviceGetCount=lambda: 1, nvmlDeviceGetHandleByIndex=lambda i: i,
            nvmlDeviceGetMemoryInfo=lambda handle: types.SimpleNamespace(used=6e9, total=8e9),
            nvmlDeviceGetUtilizationRates=lambda handle: types.SimpleNamespace(gpu=42),
            nvmlDeviceGetPowerUsage=lambda handle: 100_000, nvmlDeviceGetEnforcedPowerLimit=lambda handle: 400_000,
        )


@pytest.mark.slow
def test_stage_runs_sample_system_metrics_also_in_seconds_and_gpu_ones_where_nvml_answers(local_store, monkeypatch):
    from mlflow.system_metrics.metrics import gpu_monitor
    from mlflow.tracking.fluent import run_id_to_system_metrics_monitor

    nvml = FakeNvml()
    monkeypatch.setitem(sys.modules, "pynvml", nvml)
    monkeypatch.setattr(gpu_monitor, "pynvml", nvml, raising=False)
    intervals = []

    def stage(params):  # a stage of a few seconds: MLflow's default interval (10 s) would sample nothing
        monitor = run_id_to_system_metrics_monitor.get(tracking.current().run_id)
        intervals.append(monitor and monitor.sampling_interval)
        time.sleep(1.6 * tracking.SYSTEM_METRICS_INTERVAL_S)

    monkeypatch.setattr(pipeline, "stage_function", lambda name: stage)
    pipeline.run_pipeline(make_params(local_store / "out"), "sampled", first_stage="evaluate")
    parent, (run,) = pipeline_runs("digits", str(local_store / "out"))
    assert intervals == [tracking.SYSTEM_METRICS_INTERVAL_S]
    metrics = run.data.metrics
    assert 0 <= metrics["system/cpu_utilization_percentage"] <= 100 and metrics["system/system_memory_usage_megabytes"] > 0
    assert metrics["system/gpu_0_memory_usage_megabytes"] == 6000 and metrics["system/gpu_0_utilization_percentage"] == 42
    assert not [k for k in parent.data.metrics if k.startswith("system/")]  # its stages hold its share

    monkeypatch.setenv("MLFLOW_ENABLE_SYSTEM_METRICS_LOGGING", "false")  # MLflow's own switch is honoured
    pipeline.run_stage("evaluate", make_params(local_store / "off"), "off")
    (off,) = mlflow.search_runs(experiment_names=["digits"], filter_string="attributes.run_name = 'off/evaluate'", output_format="list")
    assert intervals[-1] is None and not [k for k in off.data.metrics if k.startswith("system/")]


@pytest.mark.slow
def test_publish_points_the_published_alias_at_the_version_of_dvc_locks_classifier(local_store, monkeypatch, capsys):
    """`ncis publish`'s registry step (the DVC push replaced by a no-op) in a project folder: the
    version a pipeline registered, else a version made from the model a stage run of its own
    (`dvc repro`) logged, and only a note where no run logged dvc.lock's classifier."""
    shutil.copy(REPO / "params.yaml", local_store)  # outputs: outputs, as dvc.lock's paths
    params = load_params(local_store / "params.yaml")
    classifier = layout_for(params).classifier
    monkeypatch.setattr(publish, "publish", lambda *args, **kwargs: [])
    client = MlflowClient()

    def save_and_log(seed: int) -> str:
        shutil.rmtree(classifier, ignore_errors=True)
        classifier.mkdir(parents=True)
        (classifier / "config.json").write_text(json.dumps({"seed": seed}))
        tracking.log_classifier_model(tiny_classifier(seed), torch.rand(4, 1, 8, 8), folder=classifier)
        return dvc_md5(classifier)

    def published(digest: str) -> tuple[int, str, str]:
        lock = {"schema": "2.0", "stages": {"train-classifier": {"outs": [{"path": "outputs/classifier", "md5": digest}]}}}
        (local_store / "dvc.lock").write_text(yaml.safe_dump(lock))
        code = main(["publish"])
        out, err = capsys.readouterr()
        return code, out, err

    with tracking.pipeline_run(params, "evaluated"):
        with tracking.stage_run(params, "train-classifier"):
            evaluated = save_and_log(1)
        with tracking.stage_run(params, "evaluate"):
            tracking.log_evaluation(REPORT)
    with tracking.stage_run(params, "train-classifier", "repro"):  # as `dvc repro` runs it: registers nothing
        reproduced = save_and_log(2)
    assert [int(v.version) for v in client.search_model_versions("name = 'ncis-digits-classifier'")] == [1]

    code, out, _ = published(evaluated)
    assert code == 0 and f"publish: models:/ncis-digits-classifier@published is dvc.lock's outputs/classifier ({evaluated})" in out
    assert int(client.get_model_version_by_alias("ncis-digits-classifier", "published").version) == 1

    code, out, _ = published(reproduced)
    version = client.get_model_version_by_alias("ncis-digits-classifier", "published")
    assert code == 0 and int(version.version) == 2 and version.tags[tracking.CLASSIFIER_HASH_TAG] == reproduced
    assert client.get_run(version.run_id).info.run_name == "repro/train-classifier"
    images = torch.rand(3, 1, 8, 8)
    torch.testing.assert_close(mlflow.pytorch.load_model("models:/ncis-digits-classifier@published")(images), tiny_classifier(2)(images))

    code, _, err = published("0" * 32 + ".dir")  # logged by no run here
    assert code == 0 and err.count("\n") == 1 and "publish: note: registry alias 'published' not set: no run in" in err
    assert int(client.get_model_version_by_alias("ncis-digits-classifier", "published").version) == 2  # left as it was

    assert published(evaluated)[0] == 0  # back to the pipeline's version, no new one
    assert int(client.get_model_version_by_alias("ncis-digits-classifier", "published").version) == 1
    assert len(client.search_model_versions("name = 'ncis-digits-classifier'")) == 2


# ---------------------------------------------------------------- `ncis ui`


def test_ui_refuses_in_one_line_without_a_store_an_experiment_or_a_free_port(local_store, capsys):
    def refused(*argv: str) -> str:
        assert main(["ui", "--no-browser", "--params", str(REPO / "params.yaml"), *argv]) == 2
        err = capsys.readouterr().err
        assert err.startswith("ncis: error: ") and err.count("\n") == 1
        return err

    assert f"no MLflow store at {local_store / 'mlflow.db'}; run the pipeline first" in refused()
    assert not (local_store / "mlflow.db").exists()  # not created by asking
    MlflowClient().create_experiment("other", artifact_location=(local_store / "mlruns").as_uri())
    capsys.readouterr()  # MLflow's notes on creating the store
    assert "no MLflow experiment 'digits' in sqlite:///" in refused()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert f"cannot serve on 127.0.0.1:{port}" in refused("--experiment", "other", "--port", str(port))


@contextlib.contextmanager
def serving_ui(store: Path, *argv: str) -> Iterator[tuple[Child, str]]:
    """`ncis ui` in `store` (MLflow's default store there; no MLFLOW_* variable) and the link it
    prints; whatever it started is killed at the end, should the test fail first."""
    import psutil

    child = Child(["ui", "--no-browser", "--port", str(free_port()), *argv], store, env=child_env())
    try:
        child.wait_for(r"Ctrl-C stops it", timeout=240)
        (url,) = re.findall(r"ui: runs table \(sorted by average AUROC\): (\S+)", child.output)
        yield child, url
    finally:
        with contextlib.suppress(psutil.NoSuchProcess):
            for process in psutil.Process(child.process.pid).children(recursive=True):
                process.kill()
        child.kill()


def stop_ui(child: Child) -> None:
    """Ctrl-C: exit 0, and the server and every process it started are gone."""
    import psutil

    started = psutil.Process(child.process.pid).children(recursive=True)
    assert started, "no server process"
    assert child.signal(signal.SIGINT)
    assert child.wait(60) == 0 and "ui: MLflow UI stopped" in child.output
    _, alive = psutil.wait_procs(started, timeout=5)
    for process in alive:
        process.kill()
    assert not alive, f"left running: {[p.cmdline() for p in alive]}"


@pytest.mark.slow
def test_ui_serves_the_local_store_on_the_runs_view_and_ctrl_c_stops_it_all(local_store):
    import requests

    experiment = MlflowClient().create_experiment("digits", artifact_location=(local_store / "mlruns").as_uri())
    with serving_ui(local_store, "--params", str(REPO / "params.yaml")) as (child, url):
        address = url.split("/#/")[0]
        assert url == f"{address}/#/experiments/{experiment}/runs?viewStateShareKey=ncis&workflowType=machine_learning"
        answer = requests.get(f"{address}/api/2.0/mlflow/experiments/get-by-name", params={"experiment_name": "digits"}, timeout=30)
        assert answer.json()["experiment"]["experiment_id"] == experiment  # this folder's store
        stop_ui(child)
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{address}/health", timeout=5)


# ---------------------------------------------------------------- run names


def test_run_name_says_benchmark_outliers_head_seed_and_what_differs_from_the_file(monkeypatch):
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    written = load_params(REPO / "params.yaml")
    assert tracking.run_name(written, baseline=written) == "digits-cvpn-monotone-seed0"
    changed = load_params(
        REPO / "params.yaml",
        ["seed=2", "cvpn.lr=0.01", "classifier.energy_head=free", "outputs=/tmp/x", "device=cpu", "diffusion.unet_channels=[8, 16]"],
    )
    # seed and head are in the name already; outputs and device change no result
    assert tracking.run_name(changed, baseline=written) == "digits-cvpn-free-seed2-diffusion.unet_channels=_8,_16-cvpn.lr=0.01"
    assert tracking.run_name(load_params(REPO / "params.yaml", ["classifier.outliers=none"]), written) == "digits-none-monotone-seed0"
    assert tracking.run_name(load_params(REPO / "params.yaml", ["sample.method=knn"]), written) == "digits-knn-monotone-seed0"
    assert tracking.run_name(changed) == "digits-cvpn-free-seed2"  # no file to compare with

    prompt = load_params(REPO / "params.yaml", ["synthesize.prompt=A photo: {}?", "embed.lr=1e-3"])
    name = tracking.run_name(prompt, written)
    assert name == "digits-cvpn-monotone-seed0-embed.lr=0.001-synthesize.prompt=A_photo"
    subprocess.run(["git", "check-ref-format", "--allow-onelevel", name], check=True)  # a valid DVC experiment name

    long = load_params(REPO / "params.yaml", [f"synthesize.prompt={'x' * 300} {{}}"])
    assert len(tracking.run_name(long, written)) == 120
    assert tracking.run_name(long, written) != tracking.run_name(load_params(REPO / "params.yaml", [f"synthesize.prompt={'x' * 301} {{}}"]), written)

    monkeypatch.setenv("DVC_EXP_NAME", "lucid-fish")  # `dvc exp run` names the experiment
    assert tracking.run_name(changed, baseline=written) == "lucid-fish"


@pytest.mark.slow
def test_cli_names_runs_from_the_params_file_or_run_name(experiment, fake_stages, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)
    assert main(["run", "--set", f"outputs={tmp_path / 'a'}", "--set", "cvpn.lr=0.01"]) == 0
    assert main(["run", "--set", f"outputs={tmp_path / 'b'}", "--run-name", "my try"]) == 0
    assert main(["evaluate", "--set", f"outputs={tmp_path / 'c'}"]) == 0
    monkeypatch.setenv("DVC_EXP_NAME", "lucid-fish")
    assert main(["evaluate", "--set", f"outputs={tmp_path / 'd'}"]) == 0

    def name(outputs):
        (run,) = mlflow.search_runs(
            experiment_names=[experiment],
            filter_string=f"params.outputs = '{tmp_path / outputs}' and tags.mlflow.parentRunId IS NULL",
            output_format="list",
        )
        return run.info.run_name, run.data.tags

    assert name("a")[0] == "digits-cvpn-monotone-seed0-cvpn.lr=0.01"
    assert name("b")[0] == "my try"
    assert name("c")[0] == "digits-cvpn-monotone-seed0/evaluate"
    assert name("d")[0] == "lucid-fish/evaluate" and name("d")[1]["dvc.exp_name"] == "lucid-fish"


# ---------------------------------------------------------------- compare


@pytest.fixture
def three_pipelines(experiment, fake_stages, tmp_path):
    """Pipelines at cvpn.lr 0.01 (run twice: only the latest counts) and 0.02; returns the runs."""
    _, knobs = fake_stages

    def pipeline_with(outputs, lr, auroc, fpr95, name):
        knobs["report"] = {**REPORT, "average": {**REPORT["average"], "auroc": auroc, "fpr95": fpr95}}
        params = make_params(tmp_path / outputs, "seed=7", f"cvpn.lr={lr}")
        pipeline.run_pipeline(params, name)
        return pipeline_runs(experiment, params.outputs)

    superseded, _ = pipeline_with("a", 0.01, 0.6, 0.5, "lr-0.01-old")
    latest, _ = pipeline_with("b", 0.01, 0.7, 0.4, "lr-0.01")  # same parameter set: only `outputs` differs
    other, (*_, evaluate) = pipeline_with("c", 0.02, 0.8, 0.45, "lr-0.02")
    return experiment, superseded, latest, other, evaluate


@pytest.mark.slow
def test_compare_one_row_per_pipeline_with_names_differing_params_and_metrics(three_pipelines, capsys):
    experiment, superseded, latest, other, evaluate = three_pipelines
    capsys.readouterr()

    rows = compare_module.compare(experiment)
    table = capsys.readouterr().out

    assert [row["name"] for row in rows] == ["lr-0.02", "lr-0.01"]  # best average AUROC first
    assert [row["run_id"] for row in rows] == [other.info.run_id, latest.info.run_id]
    assert list(rows[0]) == ["name", "cvpn.lr", *compare_module.METRICS, "run_id"]  # seed is the same: not shown
    assert rows[0]["cvpn.lr"] == "0.02" and rows[1]["cvpn.lr"] == "0.01"
    assert rows[0]["auroc/average"] == 0.8 and rows[0]["fpr95/average"] == 0.45 and rows[0]["id_accuracy"] == 0.973
    assert rows[0]["synthesize/outlier_in_class_fraction"] == 0.7
    lines = table.splitlines()
    assert lines[0].split() == list(rows[0]) and lines[1].split()[:3] == ["lr-0.02", "0.02", "0.8000"]

    assert [r["name"] for r in compare_module.compare(experiment, sort="fpr95/average")] == ["lr-0.01", "lr-0.02"]
    every = compare_module.compare(experiment, every_run=True, sort="cvpn.lr")
    assert [r["name"] for r in every] == ["lr-0.01", "lr-0.01-old", "lr-0.02"]  # stable: newest first among equals
    # chosen runs: a stage run id too (it carries the metrics it logged itself)
    chosen = compare_module.compare(experiment, [superseded.info.run_id, evaluate.info.run_id])
    assert [r["name"] for r in chosen] == ["evaluate", "lr-0.01-old"]


@pytest.mark.slow
def test_compare_formats_and_errors_through_the_cli(three_pipelines, capsys):
    experiment = three_pipelines[0]
    capsys.readouterr()

    assert main(["compare", "--format", "csv"]) == 0  # the experiment: MLFLOW_EXPERIMENT_NAME, as for runs
    rows = list(csv.DictReader(io.StringIO(capsys.readouterr().out)))
    assert [(r["name"], r["cvpn.lr"], r["auroc/average"]) for r in rows] == [("lr-0.02", "0.02", "0.8000"), ("lr-0.01", "0.01", "0.7000")]

    assert main(["compare", "--experiment", experiment, "--format", "markdown", "--sort", "fpr95/average"]) == 0
    markdown = capsys.readouterr().out.splitlines()
    assert markdown[0].startswith("| name | cvpn.lr | auroc/average |") and markdown[1].startswith("| --- |")
    assert markdown[2].startswith("| lr-0.01 | 0.01 | 0.7000 |")

    for argv, message in [
        (["compare", "--experiment", "nope"], "no MLflow experiment 'nope'"),
        (["compare", "--experiment", experiment, "--runs", "0" * 32], "not found"),
        (["compare", "--experiment", experiment, "--sort", "auroc"], "--sort 'auroc': not a column"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("ncis: error: ") and message in err and "\n" not in err


def test_compare_all_lists_every_run_of_a_parameter_set_the_default_only_its_latest(fake_stages, tmp_path, monkeypatch, capsys):
    """`ncis compare --all`, through the CLI, on a local SQLite store (no server): two finished
    pipelines of the same parameters (only `outputs` differs) are one row by default, two with --all."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "digits-compare-all")
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    MlflowClient().create_experiment("digits-compare-all", artifact_location=(tmp_path / "artifacts").as_uri())
    _, knobs = fake_stages
    for outputs, auroc in (("first", 0.6), ("second", 0.7)):
        knobs["report"] = {**REPORT, "average": {**REPORT["average"], "auroc": auroc}}
        pipeline.run_pipeline(make_params(tmp_path / outputs, "seed=7"), f"run-{outputs}")
    capsys.readouterr()

    def compared(*flags: str) -> list[tuple[str, str]]:
        assert main(["compare", "--format", "csv", *flags]) == 0
        return [(row["name"], row["auroc/average"]) for row in csv.DictReader(io.StringIO(capsys.readouterr().out))]

    assert compared() == [("run-second", "0.7000")]  # the latest of the parameter set
    assert compared("--all") == [("run-second", "0.7000"), ("run-first", "0.6000")]


@pytest.mark.slow
def test_compare_without_pipelines_says_what_to_run(experiment):
    MlflowClient().create_experiment(experiment)
    with pytest.raises(UserError, match="run `ncis run` first"):
        compare_module.compare(experiment)


# ---------------------------------------------------------------- failure paths and tracking off


def test_unreachable_server_refuses_quickly_before_any_work(fake_stages, tmp_path, monkeypatch):
    calls, _ = fake_stages
    uri = f"http://127.0.0.1:{free_port()}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    params = make_params(tmp_path / "out")

    for run in (lambda: pipeline.run_stage("train-cvpn", params), lambda: pipeline.run_pipeline(params)):
        start = time.monotonic()
        with pytest.raises(UserError) as error:
            run()
        assert time.monotonic() - start < 10
        assert uri in str(error.value) and "--no-tracking" in str(error.value)
        assert "\n" not in str(error.value)
    assert calls == []


@pytest.mark.slow
def test_tracking_disabled_creates_no_runs_and_stages_log_to_the_stand_in(tracking_uri, fake_stages, tmp_path, monkeypatch):
    calls, _ = fake_stages
    seen = []
    monkeypatch.setattr(tracking.Run, "log_metrics", lambda self, metrics, step=None: seen.append(self))
    client = MlflowClient()

    def run_count():
        ids = [e.experiment_id for e in client.search_experiments()]
        return len(client.search_runs(ids, max_results=1000))

    before = run_count()
    pipeline.run_pipeline(make_params(tmp_path / "out", "tracking.enabled=false"))
    pipeline.run_stage("evaluate", make_params(tmp_path / "out", "tracking.enabled=false"))
    assert calls == [*STAGES, "evaluate"]
    assert run_count() == before
    assert seen and all(run is tracking.NO_RUN for run in seen)


def test_outside_any_run_logging_is_a_no_op():
    assert tracking.current() is tracking.NO_RUN
    tracking.log_metrics({"x": 1.0}, step=1)
    tracking.log_evaluation(REPORT)
    assert tracking.log_classifier_model(tiny_classifier(), torch.rand(2, 1, 8, 8)) is None


def test_evaluation_metric_names_are_built_in_one_place():
    metrics = tracking.evaluation_metrics(REPORT)
    assert metrics["id_accuracy"] == 0.973
    assert metrics["auroc/letters"] == 0.91 and metrics["aupr_in/photos"] == 0.99
    assert metrics["fpr95/average"] == 0.23 and metrics["auroc/average_near"] == 0.91 and metrics["aupr_out/average_far"] == 0.98
    assert len(metrics) == 1 + 4 * (2 + 1 + 2)  # no `group` strings among them


# ---------------------------------------------------------------- `mlflow run` and the MLproject


@pytest.mark.slow
def test_mlflow_run_stage_entry_point_nests_under_the_project_run(experiment, tmp_path, monkeypatch):
    """`mlflow run . --env-manager local -e train-cvpn -P cvpn.lr=1e-3` with this repo's MLproject,
    where the `ncis` on PATH runs the real CLI with a fake stage."""
    project = tmp_path / "project"
    project.mkdir()
    for name in ("MLproject", "conda.yaml", "params.yaml"):
        shutil.copy(REPO / name, project)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_ncis = bin_dir / "ncis"
    fake_ncis.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "from ncis import pipeline, tracking\n"
        "from ncis.cli import main\n"
        "def fake(params):\n"
        "    tracking.log_metrics({'fake/lr': params.cvpn.lr})\n"
        "pipeline.stage_function = lambda name: fake\n"
        "sys.exit(main())\n"
    )
    fake_ncis.chmod(fake_ncis.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.delenv("DVC_EXP_NAME", raising=False)

    submitted = mlflow.projects.run(
        str(project),
        entry_point="train-cvpn",
        parameters={"cvpn.lr": "1e-3", "seed": "5", "outputs": str(tmp_path / "out")},
        env_manager="local",
        experiment_name=experiment,
    )

    client = MlflowClient()
    project_run = client.get_run(submitted.run_id)
    assert project_run.info.status == "FINISHED"
    # as given to `mlflow run`, completed with the rest of the parameters
    assert project_run.data.params["cvpn.lr"] == "1e-3"
    assert project_run.data.params["params_file"] == "params.yaml"
    assert set(load_params(project / "params.yaml").flat()) <= set(project_run.data.params)
    # keeps the name `mlflow run` gave it; ncis's name, from the -P values, is a tag
    assert project_run.data.tags["ncis.run_name"] == "digits-cvpn-monotone-seed5-cvpn.lr=0.001"
    assert project_run.data.tags["ncis.stage"] == "pipeline"
    (stage,) = client.search_runs([project_run.info.experiment_id], f"tags.mlflow.parentRunId = '{submitted.run_id}'")
    assert stage.info.run_name == "train-cvpn" and stage.info.status == "FINISHED"
    assert stage.data.params["cvpn.lr"] == "0.001" and stage.data.params["seed"] == "5"
    assert stage.data.metrics["fake/lr"] == 0.001


def test_mlproject_entry_points_pass_overrides_to_the_cli():
    from mlflow.projects._project_spec import load_project

    project = load_project(str(REPO))
    assert set(project._entry_points) == {*STAGES, "main"}
    for entry, command in [*((s, s) for s in STAGES), ("main", "run")]:
        line = project.get_entry_point(entry).compute_command(
            {"params_file": "configs/x.yaml", "cvpn.lr": "1e-3", "synthesize.prompt": "A photo of {}"}, None
        )
        argv = shlex.split(line)
        assert argv[0] == "ncis"
        args = parse_args(argv[1:])
        assert args.command == command and args.params == "configs/x.yaml"
        assert args.overrides == ["cvpn.lr=1e-3", "synthesize.prompt=A photo of {}"]


def test_conda_env_installs_the_package_with_pyproject_dependencies():
    dependencies = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    conda = yaml.safe_load((REPO / "conda.yaml").read_text())
    assert "python=3.11" in conda["dependencies"]
    (pip,) = [d["pip"] for d in conda["dependencies"] if isinstance(d, dict)]
    assert pip == [*dependencies, "-e ."]
    assert yaml.safe_load((REPO / "MLproject").read_text())["conda_env"] == "conda.yaml"


# ---------------------------------------------------------------- the MLflow UI in a real browser


def browse(
    chromium: str, url: str, profile: Path, screenshot: Path | None = None, expect: tuple[str, ...] = (), height: int = 1000, width: int = 1600
) -> str:
    """The DOM of `url` after the single-page app has rendered (or a screenshot of it), in headless
    Chromium. --virtual-time-budget lets the app's requests and timers run before the dump; a
    loaded machine may still need a second try."""
    command = [
        chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
        f"--user-data-dir={profile}", f"--window-size={width},{height}",
    ]
    dom = ""
    for budget in (20_000, 40_000, 80_000):
        done = subprocess.run(
            [*command, f"--virtual-time-budget={budget}", "--dump-dom", url], capture_output=True, text=True, timeout=180
        )
        dom = done.stdout
        if all(text in dom for text in expect):
            break
    if screenshot is not None:
        subprocess.run(
            [*command, "--virtual-time-budget=20000", f"--screenshot={screenshot}", url], capture_output=True, timeout=180
        )
        assert screenshot.stat().st_size > 10_000  # a rendered page, not a blank one
    return dom


def visible_text(dom: str) -> str:
    dom = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return re.sub(r"\s+", " ", html.unescape(re.sub(r"<[^>]+>", " ", dom)))


def where(name: str, text: str) -> int:
    """Position of `name` as a whole name (not as the start of a longer one)."""
    return re.search(rf"{re.escape(name)}(?![\w.=-])", text).start()


@pytest.mark.slow
def test_mlflow_ui_shows_both_pipelines_names_and_average_auroc(local_store, fake_stages, chromium, capsys, request):
    """Two `ncis run`s (fake stages, real tracking to MLflow's local default store) that differ in
    cvpn.lr, seen in the MLflow UI `ncis ui` starts: the page it prints (the runs table), the best
    pipeline's run page with the datasets its stages read, and the compare-runs page."""
    _, knobs = fake_stages
    params_file = str(REPO / "params.yaml")
    for outputs, lr, auroc in [("a", None, 0.655), ("b", "0.01", 0.612)]:
        write_stage_inputs(local_store / outputs)
        knobs["report"] = {**REPORT, "average": {**REPORT["average"], "auroc": auroc}}
        overrides = ["--params", params_file, "--set", f"outputs={local_store / outputs}", *(["--set", f"cvpn.lr={lr}"] if lr else [])]
        assert main(["run", *overrides]) == 0
    assert "ncis: runs table (sorted by average AUROC): run `ncis ui --experiment digits`" in capsys.readouterr().out
    names = ["digits-cvpn-monotone-seed0", "digits-cvpn-monotone-seed0-cvpn.lr=0.01"]
    runs = mlflow.search_runs(experiment_names=["digits"], filter_string="tags.`ncis.stage` = 'pipeline'", output_format="list")
    runs.sort(key=lambda run: run.info.run_name)
    assert [r.info.run_name for r in runs] == names
    experiment_id = runs[0].info.experiment_id
    shots = local_store / "screenshots"
    shots.mkdir()
    profile = local_store / "profile"

    with serving_ui(local_store, "--params", params_file) as (child, runs_table):
        # Wide: the grid renders only the columns in view, and MLflow's assistant panel takes a third.
        dom = browse(chromium, runs_table, profile, shots / "mlflow-runs.png", expect=(*names, "0.655", "0.612"), width=2200)
        text = visible_text(dom)
        for shown in (*names, "auroc/average", "fpr95/average", "0.655", "0.612", "2 matching runs", "Dataset", "data/train"):
            assert shown in text, f"{shown!r} not on {runs_table}"  # pipelines only, with the data they read
        assert where(names[0], text) < where(names[1], text)  # sorted by average AUROC, best first

        # The run page: the first dataset its stages read, with DVC's hash as digest, then how many more.
        address = runs_table.split("/#/")[0]
        run_page = f"{address}/#/experiments/{experiment_id}/runs/{runs[0].info.run_id}?workflowType=machine_learning"
        datasets = datasets_of(runs[0])
        shown = (f"data/train ({datasets['data/train'][0]})", f"+{len(datasets) - 1}")
        dom = browse(chromium, run_page, profile, shots / "mlflow-run-datasets.png", expect=shown, height=1300)
        text = visible_text(dom)
        for name in (names[0], "Datasets", *shown):
            assert name in text, f"{name!r} not on {run_page}"

        ids = json.dumps([r.info.run_id for r in runs], separators=(",", ":"))
        compare_page = f"{address}/#/compare-runs?runs={ids}&experiments=[\"{experiment_id}\"]&workflowType=machine_learning"
        dom = browse(chromium, compare_page, profile, shots / "mlflow-compare.png", expect=(*names, "0.655", "0.612"), height=1900)
        text = visible_text(dom)
        for shown in (*names, "cvpn.lr", "auroc/average", "0.655", "0.612"):
            assert shown in text, f"{shown!r} not on {compare_page}"
        stop_ui(child)

    keep = request.config.getoption("--ui-screenshots")
    if keep:  # relative to where pytest was started: this test works in its own folder
        for shot in shots.iterdir():
            shutil.copy(shot, request.config.invocation_params.dir / keep / shot.name)
