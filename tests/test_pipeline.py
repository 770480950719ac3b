"""The whole pipeline on digits with tiny settings: `ncis run` against a real MLflow server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from conftest import TINY_PIPELINE
from ncis.cli import main
from ncis.datasets import get_benchmark
from ncis.pipeline import STAGES

METRICS = ("fpr95", "auroc", "aupr_in", "aupr_out")  # docs/contract.md


def _cli_args(tmp_path, *more):
    args = ["run", "--set", f"outputs={tmp_path / 'outputs'}"]
    for override in [*TINY_PIPELINE, *more]:
        args += ["--set", override]
    return args


def recomputed_metrics(outputs: Path, batch_size: int) -> dict:
    """metrics.json's numbers recomputed from the saved classifier and data, without ncis's scores
    or metrics: energy = logsumexp of the logits (higher = more ID), metrics from scikit-learn."""
    import torch
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve
    from torchvision.transforms.functional import to_tensor

    from ncis.classifiers import load_classifier
    from ncis.datasets import get_benchmark, load_images

    model, _ = load_classifier(outputs / "classifier")

    def logits(folder: Path) -> tuple[np.ndarray, np.ndarray]:
        images, labels = load_images(folder, channels=1)
        # Stacked [C, H, W] tensors, as a DataLoader batches them: the same memory layout, so the
        # same convolution kernels and the very same floats as ncis's scores.
        pixels = torch.stack([to_tensor(image) for image in images])
        with torch.no_grad():  # and in ncis's batches
            return torch.cat([model(batch) for batch in pixels.split(batch_size)]).numpy(), labels

    def metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict:
        labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
        scores = np.r_[id_scores, ood_scores]
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        return {
            "fpr95": float(fpr[np.argmax(tpr >= 0.95)]),  # the lowest FPR that keeps 95% of ID accepted
            "auroc": roc_auc_score(labels, scores),
            "aupr_in": average_precision_score(labels, scores),
            "aupr_out": average_precision_score(1 - labels, -scores),
        }

    def energy(values: np.ndarray) -> np.ndarray:
        return torch.logsumexp(torch.from_numpy(values), dim=1).numpy()  # float32, as ncis: its near-ties stay ties

    id_logits, id_labels = logits(outputs / "data" / "test")
    benchmark = get_benchmark("digits")
    ood = {name: metrics(energy(id_logits), energy(logits(outputs / "data" / "ood" / name)[0])) for name in benchmark.ood_sets}
    validation = {
        name: metrics(energy(id_logits), energy(logits(outputs / "data" / "ood_val" / name)[0])) for name in benchmark.validation_ood_sets
    }
    return {"id_accuracy": float(np.mean(id_logits.argmax(1) == id_labels)), "ood": ood, "validation": validation}


def mean_of(entries: list[dict]) -> dict:
    return {metric: float(np.mean([entry[metric] for entry in entries])) for metric in METRICS}


def assert_metrics_recompute(outputs: Path, report: dict, batch_size: int) -> None:
    """Every number in metrics.json, recomputed from what the stages saved."""
    from sklearn.metrics import auc

    expected = recomputed_metrics(outputs, batch_size)
    benchmark = get_benchmark("digits")
    assert report["id_accuracy"] == pytest.approx(expected["id_accuracy"], abs=1e-12)
    # The test sets, and the validation sets apart (metrics.json "validation"), each in the same form.
    for block, sets, recomputed in ((report, benchmark.ood_sets, expected["ood"]), (report["validation"], benchmark.validation_ood_sets, expected["validation"])):
        assert list(block["ood"]) == list(sets)
        for name, entry in block["ood"].items():
            assert entry["group"] == sets[name]
            for metric in METRICS:
                assert entry[metric] == pytest.approx(recomputed[name][metric], abs=1e-6), (name, metric)
        assert block["average"] == pytest.approx(mean_of(list(recomputed.values())), abs=1e-6)
        assert block["groups"] == {
            group: pytest.approx(mean_of([recomputed[name] for name, g in sets.items() if g == group]), abs=1e-6)
            for group in ("near", "far")
        }
    # The ROC data `dvc plots` shows: each set's curve has that set's AUROC.
    rows = [line.split(",") for line in (outputs / "plots" / "roc.csv").read_text().splitlines()]
    assert rows[0] == ["set", "fpr", "tpr"]
    for name, entry in report["ood"].items():
        fpr, tpr = np.array([[float(f), float(t)] for s, f, t in rows[1:] if s == name]).T
        assert auc(fpr, tpr) == pytest.approx(entry["auroc"], abs=1e-5), name


@pytest.mark.slow
def test_ncis_run_goes_from_nothing_to_metrics_and_tracks_every_stage(tmp_path, tracking_uri):
    from mlflow.tracking import MlflowClient

    from ncis.config import load_params

    assert main(_cli_args(tmp_path)) == 0
    outputs = tmp_path / "outputs"
    report = json.loads((outputs / "metrics.json").read_text())
    assert report["benchmark"] == "digits" and report["score"] == "energy"

    assert_metrics_recompute(outputs, report, load_params().evaluate.batch_size)

    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name("digits")
    runs = client.search_runs([experiment.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 1
    children = {r.info.run_name: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parents[0].info.run_id}
    assert set(children) == set(STAGES)
    assert all(r.info.status == "FINISHED" for r in runs)
    assert children["train-cvpn"].data.params["cvpn.epochs"] == "2"
    # evaluate's MLflow metrics: exactly docs/contract.md's names ("MLflow names"), with metrics.json's values.
    logged = children["evaluate"].data.metrics
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
