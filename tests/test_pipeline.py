"""The whole pipeline on digits with tiny settings: `ncis run` against a real MLflow server."""

from __future__ import annotations

import json

import pytest

from conftest import TINY_PIPELINE
from recompute import METRICS, assert_metrics_recompute
from ncis import tracking
from ncis.cli import main
from ncis.inputs import stage_inputs
from ncis.pipeline import STAGES


def _cli_args(tmp_path, *more):
    args = ["run", "--set", f"outputs={tmp_path / 'outputs'}"]
    for override in [*TINY_PIPELINE, *more]:
        args += ["--set", override]
    return args


@pytest.mark.slow
def test_ncis_run_goes_from_nothing_to_metrics_and_tracks_every_stage(tmp_path, tracking_uri):
    from mlflow.tracking import MlflowClient

    from ncis.config import load_params

    assert main(_cli_args(tmp_path)) == 0
    outputs = tmp_path / "outputs"
    report = json.loads((outputs / "metrics.json").read_text())
    assert report["benchmark"] == "digits" and report["score"] == "energy"

    settings = load_params().evaluate
    assert_metrics_recompute(outputs, report, "digits", settings.batch_size, settings.ood_fraction, load_params().seed)

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("digits")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == set(STAGES)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert children["train-cvpn"].data.params["cvpn.epochs"] == "2"
    # evaluate's MLflow metrics: exactly docs/contract.md's names ("MLflow names"), with metrics.json's values,
    # beside MLflow's system metrics; its datasets: what ncis.inputs names, each with DVC's hash.
    logged = {k: v for k, v in children["evaluate"].data.metrics.items() if not k.startswith("system/")}
    datasets = {d.dataset.name: d.dataset.digest for d in children["evaluate"].inputs.dataset_inputs}
    expected = stage_inputs("evaluate", load_params(overrides=[f"outputs={outputs}"]))
    assert datasets == {i.name: tracking.dvc_hashes([i.path])[i.path][0] for i in expected}
    assert "system/cpu_utilization_percentage" in children["prepare"].data.metrics  # prepare trains for seconds
    wanted = {"id_accuracy": report["id_accuracy"]}
    for name, entry in [*report["ood"].items(), ("average", report["average"])] + [(f"average_{g}", e) for g, e in report["groups"].items()]:
        wanted.update({f"{metric}/{name}": entry[metric] for metric in METRICS})
    validation = report["validation"]  # the validation OOD sets: `<metric>/val_<set>`, ...
    for name, entry in [
        *((f"val_{s}", e) for s, e in validation["ood"].items()),
        ("val_average", validation["average"]),
        *((f"val_average_{g}", e) for g, e in validation["groups"].items()),
    ]:
        wanted.update({f"{metric}/{name}": entry[metric] for metric in METRICS})
    assert logged == pytest.approx(wanted, abs=1e-12)
    assert "diffusion/train_loss" in children["prepare"].data.metrics
    artifacts = {a.path for a in client.list_artifacts(children["synthesize"].info.run_id)}
    assert "preview.png" in artifacts
    assert {a.path for a in client.list_artifacts(children["evaluate"].info.run_id)} >= {"metrics.json", "plots"}

    # `--from`: only that stage and the later ones run, on what the earlier ones left, to the same result.
    data_written = (outputs / "data").stat().st_mtime_ns
    assert main([*_cli_args(tmp_path), "--from", "train-classifier"]) == 0
    assert (outputs / "data").stat().st_mtime_ns == data_written
    assert json.loads((outputs / "metrics.json").read_text()) == report
    runs = client.search_runs([experiment.experiment_id])
    later = [r for r in runs if r.data.tags.get("mlflow.parentRunId") not in (None, parents[0].info.run_id)]
    assert sorted(r.info.run_name for r in later) == ["evaluate", "train-classifier"]


def test_bad_parameters_are_refused_before_any_work(tmp_path, capsys):
    code = main(["run", "--no-tracking", "--set", f"outputs={tmp_path}", "--set", "cvpn.lr=-1"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("ncis: error: ") and "cvpn.lr" in err[-1]
    assert not any(tmp_path.iterdir())


def test_unknown_key_and_wrong_type_name_the_key(tmp_path, capsys):
    assert main(["prepare", "--no-tracking", "--set", f"outputs={tmp_path}", "--set", "embed.stepz=3"]) == 2
    assert "embed.stepz" in capsys.readouterr().err
    assert main(["prepare", "--no-tracking", "--set", f"outputs={tmp_path}", "--set", "embed.steps=many"]) == 2
    assert "embed.steps" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())
