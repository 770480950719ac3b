import json

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, roc_auc_score
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from ncis import evaluate, registry, tracking
from ncis.classifiers import build_classifier
from ncis.config import load_params
from ncis.datasets import get_benchmark, load_images, write_image_folder
from ncis.errors import UserError
from ncis.evaluate import main, ood_subset
from ncis.io import save_weights
from ncis.layout import layout_for
from ncis.scores import KNNScorer, MahalanobisScorer, energy_score, make_scorer, msp_score, odin_score, score_loader

METRICS = {"fpr95", "auroc", "aupr_in", "aupr_out"}
SETS = list(get_benchmark("digits").ood_sets)


def tiny_params(root, score="energy", **evaluate):
    settings = {"score": score, "batch_size": 16, "knn_k": 3, **evaluate}
    return load_params(overrides=[f"outputs={root}", "device=cpu", *(f"evaluate.{k}={v}" for k, v in settings.items())])


def make_tiny_benchmark(root, channels=1, ood_pixels=(100, 256)) -> nn.Module:
    """ID train/test and every digits OOD set as tiny 8x8 ImageFolders, plus an untrained (seeded) small_cnn.

    ID pixels lie in [0, 128), OOD ones in `ood_pixels`: (0, 128) makes the sets overlap."""
    rng = np.random.default_rng(0)
    layout = layout_for(tiny_params(root))
    labels = np.arange(30) % 10
    write_image_folder(layout.id_train, rng.integers(0, 128, (30, 8, 8, 1), dtype=np.uint8), labels)
    write_image_folder(layout.id_test, rng.integers(0, 128, (20, 8, 8, 1), dtype=np.uint8), labels[:20])
    for name in get_benchmark("digits").ood_sets:
        write_image_folder(layout.ood(name), rng.integers(*ood_pixels, (12, 8, 8, 1), dtype=np.uint8), np.zeros(12, int))
    for name in get_benchmark("digits").validation_ood_sets:
        write_image_folder(layout.ood_val(name), rng.integers(*ood_pixels, (12, 8, 8, 1), dtype=np.uint8), np.zeros(12, int))
    torch.manual_seed(0)
    model = build_classifier("small_cnn", 10, channels, [0.3] * channels, [0.2] * channels)
    config = {"arch": "small_cnn", "num_classes": 10, "channels": channels, "image_size": 8, "mean": [0.3] * channels, "std": [0.2] * channels}
    save_weights(layout.classifier, model, config)
    return model


class FlatFeatures(nn.Module):
    """A 'classifier' whose penultimate features are its input, to test the feature-space scores."""

    def __init__(self, dim=2):
        super().__init__()
        self.fc = nn.Linear(dim, 2)

    def features(self, images):
        return images.flatten(1)

    def forward(self, images):
        return self.fc(self.features(images))


def test_output_scores_rank_confident_logits_above_uniform_ones():
    logits = torch.tensor([[10.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    assert energy_score(logits).shape == (2,) and energy_score(logits)[0] > energy_score(logits)[1]
    assert msp_score(logits)[0] > msp_score(logits)[1]
    assert msp_score(logits)[1] == pytest.approx(1 / 3)
    random_logits = torch.randn(6, 10, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    exp = np.exp(random_logits.numpy())
    np.testing.assert_allclose(msp_score(random_logits).numpy(), (exp / exp.sum(1, keepdims=True)).max(1), rtol=1e-12)
    np.testing.assert_allclose(energy_score(random_logits).numpy(), np.log(exp.sum(1)), rtol=1e-12)

    model = build_classifier("small_cnn", 10, 1).eval()
    images = torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    scores = odin_score(model, images, temperature=1000.0, epsilon=0.0014)
    np.testing.assert_allclose(scores.numpy(), _odin_by_hand(model, images, 1000.0, 0.0014), rtol=1e-5)


def _odin_by_hand(model, images, temperature, epsilon) -> np.ndarray:
    """Liang et al. 2018: step the input by epsilon along the sign of the gradient of the tempered log-MSP."""
    images = images.detach().clone().requires_grad_(True)
    log_msp = torch.log_softmax(model(images) / temperature, dim=1).max(dim=1).values.sum()
    log_msp.backward()
    with torch.no_grad():
        # In float32 as the model: at T = 1000 the MSPs differ by less than float32-vs-float64 rounding.
        return torch.softmax(model(images + epsilon * images.grad.sign()) / temperature, dim=1).max(dim=1).values.double().numpy()


@pytest.mark.parametrize("scorer", [MahalanobisScorer(), KNNScorer(k=3)])
def test_feature_scores_prefer_points_near_the_training_clusters(scorer):
    generator = torch.Generator().manual_seed(0)
    # KNN compares directions (normalised features), so the clusters and probes differ in direction.
    centres = torch.tensor([[3.0, 0.0], [0.0, 3.0]])
    labels = torch.arange(100) % 2
    features = centres[labels] + 0.3 * torch.randn(100, 2, generator=generator)
    model = FlatFeatures()
    scorer.fit(model, DataLoader(TensorDataset(features.view(100, 2, 1, 1), labels), batch_size=32), torch.device("cpu"))
    probes = torch.tensor([[3.0, 0.0], [0.0, 3.0], [2.0, 2.0], [-3.0, -1.0]]).view(4, 2, 1, 1)
    result = score_loader(model, scorer, DataLoader(TensorDataset(probes, torch.zeros(4, dtype=torch.long))), torch.device("cpu"))
    near, between, far = result["scores"][:2], result["scores"][2], result["scores"][3]
    assert result["logits"].shape == (4, 2)
    assert near.min() > between > far


def test_odin_without_temperature_or_step_is_msp():
    model = build_classifier("small_cnn", 10, 1).eval()
    images = torch.rand(5, 1, 8, 8)
    with torch.no_grad():
        expected = msp_score(model(images))
    torch.testing.assert_close(odin_score(model, images, temperature=1.0, epsilon=0.0), expected)
    assert not torch.allclose(odin_score(model, images, temperature=1000.0, epsilon=0.0), expected)


def test_odin_steps_the_input_towards_higher_confidence():
    torch.manual_seed(0)
    # Linear logits: the cross-entropy is convex in the input, so a small step against its gradient's sign raises the MSP.
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 5)).double()
    images = torch.rand(8, 3, 2, 2, dtype=torch.float64)
    before = odin_score(model, images, temperature=1000.0, epsilon=0.0)
    after = odin_score(model, images, temperature=1000.0, epsilon=0.01)
    assert torch.all(after > before)


def test_knn_scores_the_kth_neighbour_distance():
    generator = torch.Generator().manual_seed(0)
    train = torch.randn(40, 3, generator=generator)
    probes = torch.randn(6, 3, generator=generator)
    scorer = KNNScorer(k=4)
    model = FlatFeatures(dim=3)
    scorer.fit(model, DataLoader(TensorDataset(train.view(40, 3, 1, 1), torch.zeros(40, dtype=torch.long)), batch_size=16), torch.device("cpu"))
    scores = score_loader(model, scorer, DataLoader(TensorDataset(probes.view(6, 3, 1, 1), torch.zeros(6, dtype=torch.long))), torch.device("cpu"))["scores"]
    unit = lambda x: x / x.norm(dim=1, keepdim=True)  # noqa: E731
    distances = torch.cdist(unit(probes).double(), unit(train).double()).sort(dim=1).values
    np.testing.assert_allclose(scores, -distances[:, 3].numpy(), rtol=1e-5)
    assert not np.allclose(scores, -distances[:, 0].numpy(), rtol=1e-3)  # the nearest would differ


def test_mahalanobis_is_the_distance_under_the_tied_class_covariance():
    rng = np.random.default_rng(0)
    labels = np.arange(90) % 3
    means = np.array([[0.0, 0.0, 0.0], [4.0, 0.0, 1.0], [0.0, 5.0, -2.0]])
    mixing = np.array([[2.0, 0.0, 0.0], [1.0, 0.5, 0.0], [0.0, 0.3, 0.2]])  # anisotropic and correlated
    features = (means[labels] + rng.normal(size=(90, 3)) @ mixing.T).astype(np.float32)
    probes = rng.normal(size=(7, 3)).astype(np.float32) * 3
    scorer, model = MahalanobisScorer(), FlatFeatures(dim=3)
    scorer.fit(model, DataLoader(TensorDataset(torch.as_tensor(features).view(90, 3, 1, 1), torch.as_tensor(labels)), batch_size=32), torch.device("cpu"))
    loader = DataLoader(TensorDataset(torch.as_tensor(probes).view(7, 3, 1, 1), torch.zeros(7, dtype=torch.long)))
    scores = score_loader(model, scorer, loader, torch.device("cpu"))["scores"]

    class_means = np.stack([features[labels == c].mean(0) for c in range(3)]).astype(np.float64)
    centred = features - class_means[labels]
    precision = np.linalg.inv(centred.T @ centred / len(features))  # one covariance shared by all classes
    diff = probes[:, None, :] - class_means[None]
    expected = -np.einsum("ncd,de,nce->nc", diff, precision, diff).min(axis=1)
    np.testing.assert_allclose(scores, expected, rtol=1e-4)


def test_ood_subset_is_seeded_and_a_fraction_of_the_id_test_size():
    chosen = ood_subset(500, 100, 0.2, seed=0, name="svhn")
    assert len(chosen) == 20 and len(set(chosen.tolist())) == 20 and 0 <= chosen.min() and chosen.max() < 500
    np.testing.assert_array_equal(chosen, ood_subset(500, 100, 0.2, seed=0, name="svhn"))
    assert not np.array_equal(chosen, ood_subset(500, 100, 0.2, seed=1, name="svhn"))
    assert not np.array_equal(chosen, ood_subset(500, 100, 0.2, seed=0, name="lsun"))
    assert len(ood_subset(10_000, 10_000, 0.2, seed=0, name="svhn")) == 2000  # the paper's CIFAR-100 count
    assert ood_subset(500, 100, 0.0, seed=0, name="svhn") is None  # 0 = every image
    assert ood_subset(15, 100, 0.2, seed=0, name="svhn") is None  # a smaller set is scored whole


def test_evaluate_scores_the_ood_subset_only(tmp_path, monkeypatch):
    make_tiny_benchmark(tmp_path)  # 20 ID test images, 12 per OOD set
    scored = {}
    monkeypatch.setattr(evaluate, "write_plots", lambda folder, score, id_scores, ood_scores, metrics: scored.update(ood_scores))
    main(tiny_params(tmp_path, ood_fraction=0.25))
    assert {name: len(scores) for name, scores in scored.items()} == dict.fromkeys(SETS, 5)
    main(tiny_params(tmp_path))
    assert {len(scores) for scores in scored.values()} == {12}


def _check_metrics_file(path, score) -> dict:
    metrics = json.loads(path.read_text())
    assert set(metrics) == {"benchmark", "score", "id_accuracy", "ood", "average", "groups", "validation"}
    assert metrics["benchmark"] == "digits" and metrics["score"] == score
    assert list(metrics["ood"]) == SETS
    assert metrics["ood"]["letters"]["group"] == "near" and metrics["ood"]["noise"]["group"] == "far"
    assert list(metrics["groups"]) == ["near", "far", "stats"]
    for entry in [*metrics["ood"].values(), metrics["average"], *metrics["groups"].values()]:
        assert set(entry) - {"group"} == METRICS
    return metrics


def _pixels(folder) -> tuple[torch.Tensor, np.ndarray]:
    """The PNGs of `folder` as the [0, 1] float tensor the classifier takes, read with numpy alone."""
    images, labels = load_images(folder)
    return torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255, labels


def _fpr95_brute_force(id_scores, ood_scores) -> float:
    """The lowest OOD acceptance rate over every threshold (score >= t) that keeps >= 95% of the ID images."""
    rates = [np.mean(ood_scores >= t) for t in np.concatenate([id_scores, ood_scores]) if np.mean(id_scores >= t) >= 0.95]
    return float(min(rates))


def _expected_metrics(id_scores, ood_scores) -> dict:
    labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
    scores = np.r_[id_scores, ood_scores]
    return {
        "fpr95": _fpr95_brute_force(id_scores, ood_scores),
        "auroc": roc_auc_score(labels, scores),
        "aupr_in": average_precision_score(labels, scores),
        "aupr_out": average_precision_score(1 - labels, -scores),
    }


def _recompute(root, model, score_of_images) -> dict:
    """metrics.json's numbers, recomputed from the images and the model with numpy and sklearn."""
    layout = layout_for(tiny_params(root))
    benchmark = get_benchmark("digits")
    model.eval()
    id_images, id_labels = _pixels(layout.id_test)
    id_scores = score_of_images(id_images)
    with torch.no_grad():
        id_accuracy = float(np.mean(model(id_images).numpy().argmax(1) == id_labels))
    ood = {name: _expected_metrics(id_scores, score_of_images(_pixels(layout.ood(name))[0])) for name in benchmark.ood_sets}
    validation = {name: _expected_metrics(id_scores, score_of_images(_pixels(layout.ood_val(name))[0])) for name in benchmark.validation_ood_sets}

    def mean(entries):
        return {m: float(np.mean([e[m] for e in entries])) for m in METRICS}

    def groups(sets, by_set):
        return {group: mean([by_set[n] for n, g in sets.items() if g == group]) for group in dict.fromkeys(sets.values())}

    return {
        "id_accuracy": id_accuracy,
        "ood": ood,
        "average": mean(ood.values()),
        "groups": groups(benchmark.ood_sets, ood),
        "validation": {"ood": validation, "average": mean(validation.values()), "groups": groups(benchmark.validation_ood_sets, validation)},
    }


def _assert_metrics_equal(metrics, expected):
    assert metrics["id_accuracy"] == pytest.approx(expected["id_accuracy"], abs=1e-12)
    for report, reference in [(metrics, expected), (metrics["validation"], expected["validation"])]:
        for name, entry in reference["ood"].items():
            assert {m: report["ood"][name][m] for m in METRICS} == pytest.approx(entry, abs=1e-9), name
        assert report["average"] == pytest.approx(reference["average"], abs=1e-9)
        assert list(report["groups"]) == list(reference["groups"])
        for group, entry in reference["groups"].items():
            assert report["groups"][group] == pytest.approx(entry, abs=1e-9), group


def _logits(model, images) -> np.ndarray:
    with torch.no_grad():
        return model.eval()(images).double().numpy()


def _energy_by_hand(model, images) -> np.ndarray:
    logits = _logits(model, images)
    return np.log(np.exp(logits).sum(1))


def _msp_by_hand(model, images) -> np.ndarray:
    exp = np.exp(_logits(model, images))
    return (exp / exp.sum(1, keepdims=True)).max(1)


def test_evaluate_writes_metrics_plots_and_logs(tmp_path, monkeypatch, capsys):
    model = make_tiny_benchmark(tmp_path, ood_pixels=(0, 128))  # overlapping sets: metrics strictly between 0 and 1
    logged = {}
    monkeypatch.setattr(tracking.Run, "log_summary", lambda run, metrics: logged.update(metrics))  # the no-op stand-in
    params = tiny_params(tmp_path, "energy")
    returned = main(params)
    layout = layout_for(params)
    metrics = _check_metrics_file(layout.metrics, "energy")
    assert metrics == returned
    expected = _recompute(tmp_path, model, lambda images: _energy_by_hand(model, images))
    _assert_metrics_equal(metrics, expected)
    assert 0 < expected["average"]["auroc"] < 1 and expected["average"]["auroc"] != 0.5  # not a degenerate case

    # MLflow names (docs/contract.md) with the recomputed values.
    assert logged["id_accuracy"] == pytest.approx(expected["id_accuracy"], abs=1e-12)
    for metric in METRICS:
        for name in SETS:
            assert logged[f"{metric}/{name}"] == pytest.approx(expected["ood"][name][metric], abs=1e-9)
        assert logged[f"{metric}/average"] == pytest.approx(expected["average"][metric], abs=1e-9)
        for group in ("near", "far", "stats"):
            assert logged[f"{metric}/average_{group}"] == pytest.approx(expected["groups"][group][metric], abs=1e-9)
        for name, entry in expected["validation"]["ood"].items():
            assert logged[f"{metric}/val_{name}"] == pytest.approx(entry[metric], abs=1e-9)
        assert logged[f"{metric}/val_average"] == pytest.approx(expected["validation"]["average"][metric], abs=1e-9)

    assert {p.name for p in layout.plots.iterdir()} == {
        "roc.png",
        "roc.csv",
        *(f"scores_{name}.png" for name in SETS),
    }
    assert all(p.read_bytes().startswith(b"\x89PNG") for p in layout.plots.glob("*.png"))
    curves = (layout.plots / "roc.csv").read_text().splitlines()
    assert curves[0] == "set,fpr,tpr" and {line.split(",")[0] for line in curves[1:]} == set(SETS)
    assert "FPR95" in capsys.readouterr().out


def _reference_scores(root, model, score):
    """Scores computed outside `evaluate.main`: by hand for the output scores; for the feature scores, the
    scorer (its maths is tested above) fitted here on the ID training images."""
    if score == "msp":
        return lambda images: _msp_by_hand(model, images)
    params = tiny_params(root, score)
    if score == "odin":
        return lambda images: _odin_by_hand(model, images, params.evaluate.odin_temperature, params.evaluate.odin_epsilon)
    scorer = make_scorer(params.evaluate)
    train, labels = _pixels(layout_for(params).id_train)
    scorer.fit(model.eval(), DataLoader(TensorDataset(train, torch.as_tensor(labels)), batch_size=7), torch.device("cpu"))

    def scores(images):
        loader = DataLoader(TensorDataset(images, torch.zeros(len(images), dtype=torch.long)), batch_size=5)
        return score_loader(model, scorer, loader, torch.device("cpu"))["scores"].astype(np.float64)

    return scores


@pytest.mark.parametrize("score", [name for name in registry.SCORES if name != "energy"])
def test_every_score_gives_the_metrics_of_its_scores(tmp_path, monkeypatch, score):
    model = make_tiny_benchmark(tmp_path, ood_pixels=(0, 128))
    monkeypatch.setattr(evaluate, "write_plots", lambda *args, **kwargs: None)  # plots are tested above
    params = tiny_params(tmp_path, score)
    returned = main(params)
    assert _check_metrics_file(layout_for(params).metrics, score) == returned
    _assert_metrics_equal(returned, _recompute(tmp_path, model, _reference_scores(tmp_path, model, score)))


def test_an_unknown_score_is_refused_when_params_are_read():
    with pytest.raises(UserError, match=r"evaluate.score: .*unknown score 'vim'.*mahalanobis"):
        tiny_params("outputs", score="vim")


def test_missing_classifier_names_train_classifier(tmp_path):
    with pytest.raises(UserError, match="ncis train-classifier"):
        main(tiny_params(tmp_path))


def test_classifier_of_another_shape_is_refused(tmp_path):
    make_tiny_benchmark(tmp_path, channels=3)
    with pytest.raises(UserError, match="train-classifier"):
        main(tiny_params(tmp_path))


def test_missing_ood_set_names_prepare(tmp_path):
    make_tiny_benchmark(tmp_path)
    layout = layout_for(tiny_params(tmp_path))
    for path in sorted(layout.ood("photos").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    layout.ood("photos").rmdir()
    with pytest.raises(UserError, match="photos.*ncis prepare"):
        main(tiny_params(tmp_path))
