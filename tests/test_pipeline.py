"""The whole pipeline on digits with tiny settings: `ncis run` against a real MLflow server."""

from __future__ import annotations

import json

import pytest

from ncis.cli import main
from ncis.pipeline import STAGES

# Every stage, each cut to seconds; the same keys a user would --set.
TINY_PIPELINE = [
    "diffusion.train_steps=30",
    "diffusion.unet_channels=[8, 16]",
    "diffusion.text_width=16",
    "data.ood_size=40",
    "embed.image_limit=60",
    "embed.steps=1",
    "embed.noise_draws=2",
    "cvpn.epochs=2",
    "sample.candidates=40",
    "sample.keep=2",
    "sample.rounds=2",
    "synthesize.steps=3",
    "synthesize.control_per_class=1",
    "classifier.epochs=1",
]


def _cli_args(tmp_path, *more):
    args = ["run", "--set", f"outputs={tmp_path / 'outputs'}"]
    for override in [*TINY_PIPELINE, *more]:
        args += ["--set", override]
    return args


@pytest.mark.slow
def test_ncis_run_goes_from_nothing_to_metrics_and_tracks_every_stage(tmp_path, tracking_uri):
    from mlflow.tracking import MlflowClient

    assert main(_cli_args(tmp_path)) == 0
    metrics = json.loads((tmp_path / "outputs" / "metrics.json").read_text())
    assert metrics["benchmark"] == "digits" and metrics["score"] == "energy"
    assert set(metrics["ood"]) == {"letters", "photos", "textures", "noise"}
    for values in [*metrics["ood"].values(), metrics["average"]]:
        assert all(0 <= values[k] <= 1 for k in ("fpr95", "auroc", "aupr_in", "aupr_out"))

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("digits")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == set(STAGES)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert children["train-cvpn"].data.params["cvpn.epochs"] == "2"
    evaluated = children["evaluate"].data.metrics
    assert evaluated["fpr95/average"] == pytest.approx(metrics["average"]["fpr95"])
    assert evaluated["auroc/letters"] == pytest.approx(metrics["ood"]["letters"]["auroc"])
    assert "id_accuracy" in evaluated
    assert "diffusion/train_loss" in children["prepare"].data.metrics
    artifacts = {a.path for a in client.list_artifacts(children["synthesize"].info.run_id)}
    assert "preview.png" in artifacts
    assert {a.path for a in client.list_artifacts(children["evaluate"].info.run_id)} >= {"metrics.json", "plots"}


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
