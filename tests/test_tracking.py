"""MLflow layer against a real `mlflow server` (conftest.py): runs, nesting, params, metrics,
artifacts, the pytorch model round trip, `compare`, `mlflow run`, and the failure paths.

The pipeline's stages are replaced by tiny fakes through `ncis.pipeline.stage_function`.
"""

from __future__ import annotations

import os
import shlex
import shutil
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import mlflow
import pytest
import torch
import yaml
from mlflow import MlflowClient

from ncis import pipeline, tracking
from ncis.cli import parse_args
from ncis.pipeline import STAGES
from ncis.config import load_params, params_from_dict
from ncis.errors import UserError
from conftest import free_port

REPO = Path(__file__).resolve().parents[1]
REPORT = {  # metrics.json as in ARCHITECTURE.md
    "benchmark": "digits",
    "score": "energy",
    "id_accuracy": 0.973,
    "ood": {
        "letters": {"group": "near", "fpr95": 0.41, "auroc": 0.91, "aupr_in": 0.93, "aupr_out": 0.87},
        "photos": {"group": "far", "fpr95": 0.05, "auroc": 0.99, "aupr_in": 0.99, "aupr_out": 0.98},
    },
    "average": {"fpr95": 0.23, "auroc": 0.95, "aupr_in": 0.96, "aupr_out": 0.92},
}


def make_params(outputs: Path, **tree):
    """params.yaml with `outputs` and the given sections' keys replaced."""
    base = load_params(Path(__file__).resolve().parents[1] / "params.yaml").model_dump()
    for key, value in tree.items():
        base[key] = {**base[key], **value} if isinstance(value, dict) else value
    return params_from_dict({**base, "outputs": str(outputs)})


@pytest.fixture
def fake_stages(monkeypatch):
    """Replace every stage by a fake that logs a metric and an artifact folder (`evaluate`: REPORT's
    metrics); returns the list of stages called, and `fail` / `report` knobs."""
    calls: list[str] = []
    knobs = {"fail": None, "report": REPORT}

    def stage_function(name):
        def main(params):
            calls.append(name)
            if name == knobs["fail"]:
                raise RuntimeError(f"{name} broke")
            tracking.log_metrics({f"{name}/done": 1, "not_computed": None}, step=0)
            folder = Path(params.outputs) / name
            folder.mkdir(parents=True, exist_ok=True)
            (folder / "config.json").write_text("{}")
            tracking.log_artifact(folder)
            if name == "evaluate":
                tracking.log_evaluation(knobs["report"])

        return main

    monkeypatch.setattr(pipeline, "stage_function", stage_function)
    return calls, knobs


def pipeline_runs(client, outputs: Path):
    """(parent, children in start order) of the pipeline that wrote to `outputs`."""
    experiment = client.get_experiment_by_name("digits")
    found = client.search_runs(
        [experiment.experiment_id], f"params.outputs = '{outputs}'", order_by=["attributes.start_time ASC"]
    )
    parents = [r for r in found if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = [r for r in found if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id]
    return parents[0], children


def test_pipeline_nests_stage_runs_with_params_metrics_artifacts_and_tags(tracking_uri, fake_stages, tmp_path, monkeypatch):
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
    params = make_params(tmp_path / "out", cvpn={"lr": 0.003})

    pipeline.run_pipeline(params)

    assert calls == list(STAGES)
    parent, children = pipeline_runs(MlflowClient(), params.outputs)
    expected_params = {k: str(v) for k, v in params.flat().items()}
    assert parent.info.run_name == "pipeline" and parent.info.status == "FINISHED"
    assert parent.data.params == expected_params
    assert [c.info.run_name for c in children] == list(STAGES)
    client = MlflowClient()
    for child in children:
        stage = child.info.run_name
        assert child.info.status == "FINISHED"
        assert child.data.tags["ncis.stage"] == stage
        assert child.data.params == expected_params
        assert child.data.params["cvpn.lr"] == "0.003"
        assert child.data.metrics[f"{stage}/done"] == 1.0
        assert "not_computed" not in child.data.metrics
        assert [a.path for a in client.list_artifacts(child.info.run_id, stage)] == [f"{stage}/config.json"]
        assert "ncis.git_dirty" not in child.data.tags
    evaluate = children[-1].data.metrics
    assert evaluate["fpr95/letters"] == 0.41 and evaluate["aupr_out/photos"] == 0.98
    assert evaluate["fpr95/average"] == 0.23 and evaluate["auroc/average"] == 0.95
    assert evaluate["id_accuracy"] == 0.973
    embed_tags = children[1].data.tags
    assert embed_tags["dvc.dep.outputs/data"] == "fresh.dir"  # the producer's out, not embed's stale dep
    assert embed_tags["dvc.dep.ncis/embed.py"] == "abc"


def test_failed_stage_marks_its_runs_failed_and_reraises(tracking_uri, fake_stages, tmp_path):
    calls, knobs = fake_stages
    knobs["fail"] = "sample"
    params = make_params(tmp_path / "out")

    with pytest.raises(RuntimeError, match="sample broke"):
        pipeline.run_pipeline(params)

    assert calls == ["prepare", "embed", "train-cvpn", "sample"]
    parent, children = pipeline_runs(MlflowClient(), params.outputs)
    assert parent.info.status == "FAILED"
    assert [(c.info.run_name, c.info.status) for c in children] == [
        ("prepare", "FINISHED"), ("embed", "FINISHED"), ("train-cvpn", "FINISHED"), ("sample", "FAILED")
    ]


def test_classifier_model_round_trip_and_git_tags(tracking_uri, tmp_path, monkeypatch):
    monkeypatch.chdir(REPO)
    torch.manual_seed(0)
    model = torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Flatten(), torch.nn.Linear(4 * 8 * 8, 10)
    )
    with tracking.stage_run(make_params(tmp_path / "out"), "train-classifier") as run:
        info = tracking.log_classifier_model(model, torch.rand(4, 1, 8, 8))

    loaded = mlflow.pytorch.load_model(info.model_uri)
    images = torch.rand(3, 1, 8, 8)  # another batch size than the example's
    torch.testing.assert_close(loaded(images), model(images))

    tags = MlflowClient().get_run(run.info.run_id).data.tags
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=REPO)
    if head.returncode == 0:
        assert tags["mlflow.source.git.commit"] == head.stdout.strip()
        assert tags["ncis.git_dirty"] in ("true", "false")


def test_compare_latest_finished_evaluate_per_parameter_set(tracking_uri, fake_stages, tmp_path, capsys):
    _, knobs = fake_stages

    def evaluated(outputs, lr, fpr95, whole_pipeline=False):
        knobs["report"] = {**REPORT, "average": {**REPORT["average"], "fpr95": fpr95}}
        params = make_params(tmp_path / outputs, seed=7, cvpn={"lr": lr})
        if whole_pipeline:
            pipeline.run_pipeline(params)
            parent, (*_, evaluate) = pipeline_runs(MlflowClient(), params.outputs)
            return parent, evaluate
        with tracking.stage_run(params, "evaluate") as run:
            pipeline.stage_function("evaluate")(params)
        return None, MlflowClient().get_run(run.info.run_id)

    _, superseded = evaluated("a", 0.01, 0.5)
    _, latest = evaluated("b", 0.01, 0.3)  # same parameter set: only `outputs` differs
    other_parent, other = evaluated("c", 0.02, 0.2, whole_pipeline=True)
    capsys.readouterr()

    rows = {row["run_id"]: row for row in tracking.compare("digits")}
    table = capsys.readouterr().out

    assert superseded.info.run_id not in rows
    assert rows[latest.info.run_id]["fpr95/average"] == 0.3
    assert rows[other.info.run_id]["fpr95/average"] == 0.2
    assert rows[other.info.run_id]["auroc/average"] == 0.95 and rows[other.info.run_id]["id_accuracy"] == 0.973
    assert rows[other.info.run_id]["cvpn.lr"] == "0.02"
    header = table.splitlines()[0].split()
    assert {"run_id", "cvpn.lr", "fpr95/average", "auroc/average", "id_accuracy"} <= set(header)
    assert other.info.run_id in table

    # A pipeline's parent run id stands for its `evaluate` run.
    (row,) = tracking.compare("digits", [other_parent.info.run_id])
    assert row["run_id"] == other.info.run_id
    with pytest.raises(UserError, match="no MLflow experiment 'nope'"):
        tracking.compare("nope")
    with pytest.raises(UserError, match="not found"):
        tracking.compare("digits", ["0" * 32])


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


def test_tracking_disabled_creates_no_runs(tracking_uri, fake_stages, tmp_path):
    calls, _ = fake_stages
    client = MlflowClient()

    def run_count():
        ids = [e.experiment_id for e in client.search_experiments()]
        return len(client.search_runs(ids, max_results=1000))

    before = run_count()
    pipeline.run_pipeline(make_params(tmp_path / "out", tracking={"enabled": False}))
    pipeline.run_stage("evaluate", make_params(tmp_path / "out", tracking={"enabled": False}))
    assert calls == [*STAGES, "evaluate"]
    assert run_count() == before


def test_mlflow_run_stage_entry_point_nests_under_the_project_run(tracking_uri, tmp_path, monkeypatch):
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

    submitted = mlflow.projects.run(
        str(project),
        entry_point="train-cvpn",
        parameters={"cvpn.lr": "1e-3", "seed": "5", "outputs": str(tmp_path / "out")},
        env_manager="local",
        experiment_name="digits",
    )

    client = MlflowClient()
    project_run = client.get_run(submitted.run_id)
    assert project_run.info.status == "FINISHED"
    # as given to `mlflow run`, completed with the rest of the parameters
    assert project_run.data.params["cvpn.lr"] == "1e-3"
    assert project_run.data.params["params_file"] == "params.yaml"
    assert set(load_params(project / "params.yaml").flat()) <= set(project_run.data.params)
    (stage,) = client.search_runs(
        [project_run.info.experiment_id], f"tags.mlflow.parentRunId = '{submitted.run_id}'"
    )
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
