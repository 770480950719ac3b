"""cVPN: exact inverse, unit Jacobian determinant, class conditioning, PCA rule for k, training, stage."""

import json

import numpy as np
import pytest
import torch

from ncis.config import load_params
from ncis.cvpn import CVPN, count_invariants, load_cvpn
from ncis.errors import UserError
from ncis.io import save_arrays, save_weights
from ncis.layout import layout_for
from ncis.train_cvpn import evaluate, fit_cvpn, reconstruction_loss
from ncis.train_cvpn import main as train_cvpn
import ncis.train_cvpn as train_cvpn_module

# ncis' own coupling design (digits) and the paper's (configs/*.yaml).
DESIGNS = {
    "ncis": {"activation": "silu", "conditioning": "concat", "init": "identity"},
    "paper": {"activation": "sigmoid", "conditioning": "add", "init": "paper"},
}


def random_cvpn(dim=6, num_classes=3, design="ncis", **kwargs) -> CVPN:
    """A cVPN whose couplings are not the identity (ncis' design starts as one)."""
    torch.manual_seed(0)
    model = CVPN(dim, num_classes, coupling_layers=3, hidden=16, class_embedding=4, **DESIGNS[design], **kwargs)
    if design == "ncis":
        with torch.no_grad():
            for coupling in model.couplings:
                coupling.shift[-1].weight.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("design", DESIGNS)
def test_unit_jacobian_determinant(design):
    model = random_cvpn(design=design).double()
    x = torch.randn(6, dtype=torch.float64)
    for label in range(3):
        jacobian = torch.autograd.functional.jacobian(lambda v: model(v, label), x)
        assert torch.linalg.det(jacobian).abs().item() == pytest.approx(1.0, abs=1e-9)
        assert (jacobian - torch.eye(6, dtype=torch.float64)).abs().max() > 0.1  # not a trivial map


def test_paper_coupling_has_the_reference_layers():
    """model.py:59-89: Linear(r, H), Sigmoid, Linear(H, H), + Linear(SiLU(embedding)), Sigmoid, Linear(H, H), Sigmoid, Linear(H, D // 2)."""
    dim, hidden, embedding = 7, 16, 16
    model = CVPN(dim, 2, coupling_layers=1, hidden=hidden, class_embedding=embedding, **DESIGNS["paper"])
    shift = model.couplings[0].shift
    rest, out = dim - dim // 2, dim // 2
    layers = [(rest, hidden), (hidden, hidden), (hidden, hidden), (hidden, out), (embedding, hidden)]
    assert sum(p.numel() for p in shift.parameters()) == sum(i * o + o for i, o in layers)
    assert [type(m).__name__ for m in shift.post] == ["Sigmoid", "Linear", "Sigmoid", "Linear"]
    assert type(shift.embed[0]).__name__ == "SiLU"
    # Adding the class term changes the output (concatenation would have widened the first layer instead).
    rest_input, condition = torch.randn(4, rest), model.classes(torch.tensor([0, 0, 1, 1]))
    with torch.no_grad():
        assert (shift(rest_input, condition) - shift.post(shift.pre(rest_input))).abs().max() > 1e-4


@pytest.mark.parametrize("design", DESIGNS)
def test_exact_inverse_both_ways(design):
    model = random_cvpn(design=design, mean=torch.arange(6.0)).double()  # float64: exact up to round-off
    x, y = torch.randn(32, 6, dtype=torch.float64), torch.randint(0, 3, (32,))
    with torch.no_grad():
        torch.testing.assert_close(model.inverse(model(x, y), y), x, atol=1e-10, rtol=1e-10)
        torch.testing.assert_close(model(model.inverse(x, y), y), x, atol=1e-10, rtol=1e-10)


def test_class_changes_the_mapping():
    model = random_cvpn()
    x = torch.randn(8, 6)
    with torch.no_grad():
        assert (model(x, 0) - model(x, 1)).abs().max() > 1e-3


def test_save_and_load_round_trip(tmp_path):
    model = random_cvpn(num_invariants=2, mean=torch.ones(6))
    save_weights(tmp_path / "cvpn", model, model.architecture())
    loaded = load_cvpn(tmp_path / "cvpn")
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, 2), model(x, 2))
    assert loaded.num_invariants == 2


def test_reconstruction_detach_keeps_the_loss_but_drops_the_forward_gradient():
    model = random_cvpn(num_invariants=2)
    x, y = torch.randn(16, 6), torch.randint(0, 3, (16,))

    def gradient(detach: bool) -> tuple[float, torch.Tensor]:
        model.zero_grad()
        loss = reconstruction_loss(model, x, y, model(x, y) if detach else None)
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()])

    (detached_loss, detached), (full_loss, full) = gradient(True), gradient(False)
    assert detached_loss == pytest.approx(full_loss, rel=1e-5)  # the same number...
    assert (detached - full).norm() > 0.05 * full.norm()  # ...but only the inverse pass is trained


def test_holdout_zero_selects_on_training_data_and_restores_the_best_epoch():
    embeddings, labels = circles(n=100)
    # A large step overshoots after epoch 1, so the best epoch is not the last one.
    update = {"hidden": 32, "epochs": 3, "lr": 0.3, "batch_size": 64, "holdout_fraction": 0.0, **DESIGNS["paper"], "reconstruction_detach": True}
    config = load_params().cvpn.model_copy(update=update)
    result = fit_cvpn(embeddings, labels, 3, config, num_invariants=1, progress=False)
    assert result.selected_on == "train" and len(result.holdout_index) == 0 and len(result.train_index) == len(labels)
    history = [entry["train_invariant_mse"] for entry in result.history]
    assert 0 < result.best_epoch < config.epochs and result.best_epoch == int(np.argmin(history))
    restored, _ = evaluate(result.model, torch.as_tensor(embeddings), torch.as_tensor(labels))
    assert history[result.best_epoch] < 0.99 * history[-1]  # so the next line tells the two apart
    assert restored == pytest.approx(history[result.best_epoch], rel=1e-5)


def test_invariant_count_from_pca_of_known_rank():
    rng = np.random.default_rng(0)
    dim = 10

    def low_rank(rank, n=200):
        return rng.normal(size=(n, rank)) @ rng.normal(size=(rank, dim)) + 1e-4 * rng.normal(size=(n, dim))

    embeddings = np.concatenate([low_rank(3), low_rank(5)])
    labels = np.repeat([0, 1], 200)
    assert count_invariants(embeddings, labels, pca_variance_percent=5.0) == round(((10 - 3) + (10 - 5)) / 2)
    # The reference's rule: one more than the dropped dimensions, mean floored (trainer.py:55-71).
    ranks_3_and_4 = np.concatenate([low_rank(3), low_rank(4)])
    assert count_invariants(ranks_3_and_4, labels, 5.0, "dropped_rounded") == round((7 + 6) / 2) == 6
    assert count_invariants(ranks_3_and_4, labels, 5.0, "plus_one_floored") == (8 + 7) // 2 == 7
    # Isotropic data has no invariant direction, but at least one is always learned.
    assert count_invariants(rng.normal(size=(400, dim)), np.zeros(400, int), pca_variance_percent=1.0) == 1


def circles(n=200, num_classes=3, seed=0):
    """Per class, a circle of radius 1 + class plus two free Gaussian coordinates, rotated in R^4.

    The radius is a non-linear invariant; every linear direction has variance >= 0.5.
    """
    rng = np.random.default_rng(seed)
    angle = rng.uniform(0, 2 * np.pi, (num_classes, n))
    radius = (1.0 + np.arange(num_classes))[:, None]
    circle = np.stack([radius * np.cos(angle), radius * np.sin(angle)], axis=-1)
    points = np.concatenate([circle, rng.normal(size=(num_classes, n, 2))], axis=-1).reshape(-1, 4)
    rotation, _ = np.linalg.qr(rng.normal(size=(4, 4)))
    return (points @ rotation.T).astype(np.float32), np.repeat(np.arange(num_classes), n)


def test_training_learns_a_non_linear_invariant():
    embeddings, labels = circles()
    config = load_params().cvpn.model_copy(update={"hidden": 64, "epochs": 30, "lr": 3e-3, "batch_size": 64})
    result = fit_cvpn(embeddings, labels, 3, config, num_invariants=1, progress=False)
    initial = result.history[0]["holdout_invariant_mse"]
    assert result.best_invariant_mse < 0.2 * initial
    assert result.best_invariant_mse < 0.25  # below what any linear invariant can reach
    assert result.history[-1]["reconstruction_loss"] < result.history[1]["reconstruction_loss"]


def test_a_trained_cvpn_maps_the_same_point_to_different_outliers_per_class():
    embeddings, labels = circles()
    update = {"hidden": 32, "epochs": 10, "lr": 3e-3, "batch_size": 64, **DESIGNS["paper"], "reconstruction_detach": True}
    config = load_params().cvpn.model_copy(update=update)
    model = fit_cvpn(embeddings, labels, 3, config, num_invariants=1, progress=False).model
    x = torch.as_tensor(embeddings[labels == 0])
    with torch.no_grad():
        z = model(x, 0)
        outliers = 1.5 * z  # further out than the class, as sample's low-density draws are
        right, wrong = model.inverse(outliers, 0), model.inverse(outliers, 2)
        torch.testing.assert_close(model.inverse(z, 0), x, atol=1e-4, rtol=1e-4)
    spread = float(x.std(0).mean())
    assert float((right - wrong).norm(dim=1).mean()) > 0.1 * spread


def fake_embeddings(path, num_classes=10, per_class=20, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    embeddings = rng.normal(size=(num_classes * per_class, dim)) + 10 * np.repeat(rng.normal(size=(num_classes, dim)), per_class, 0)
    save_arrays(path, embeddings=embeddings.astype(np.float32), labels=np.repeat(np.arange(num_classes), per_class))


def stage_params(tmp_path, *extra):
    return load_params(
        overrides=[f"outputs={tmp_path}", "device=cpu", "tracking.enabled=false", "cvpn.epochs=2", "cvpn.hidden=16", *extra]
    )


def test_stage_writes_weights_and_config(tmp_path, monkeypatch):
    # Per class, points on a 3-dimensional affine subspace of R^8: PCA keeps 3 components, so k = 8 - 3.
    rng = np.random.default_rng(0)
    per_class, rank, dim = 20, 3, 8
    embeddings = np.concatenate(
        [10 * rng.normal(size=dim) + rng.normal(size=(per_class, rank)) @ rng.normal(size=(rank, dim)) for _ in range(10)]
    ) + 1e-4 * rng.normal(size=(10 * per_class, dim))
    embeddings, labels = embeddings.astype(np.float32), np.repeat(np.arange(10), per_class)
    params = stage_params(tmp_path, "cvpn.preprocess=center", "cvpn.holdout_fraction=0.0")  # evaluated on all points
    save_arrays(layout_for(params).embeddings, embeddings=embeddings, labels=labels)
    fitted = []
    monkeypatch.setattr(train_cvpn_module, "fit_cvpn", lambda *args, **kwargs: fitted.append(fit_cvpn(*args, **kwargs)) or fitted[-1])
    config = train_cvpn(params)
    assert json.loads((layout_for(params).cvpn / "config.json").read_text()) == json.loads(json.dumps(config))
    assert (config["dim"], config["num_classes"], config["hidden"], config["preprocess"]) == (8, 10, 16, "center")
    assert config["num_invariants"] == dim - rank == 5
    np.testing.assert_allclose(config["mean"], embeddings.astype(np.float64).mean(0), rtol=1e-5, atol=1e-5)

    # The saved weights reload to a model whose errors on the data are the ones the config reports.
    model = load_cvpn(layout_for(params).cvpn)
    x, y = torch.as_tensor(embeddings), torch.as_tensor(labels)
    with torch.no_grad():
        invariant_mse = model.invariants(model(x, y)).square().mean().item()
        reconstruction_mse = (model.project(x, y) - x).square().mean().item()
    assert model.num_invariants == 5 and config["selected_on"] == "train"
    torch.testing.assert_close(model.center, torch.tensor(config["mean"]), rtol=0, atol=0)
    with torch.no_grad():  # the trained model, reloaded: the same outputs
        torch.testing.assert_close(model(x, y), fitted[0].model.eval()(x, y), rtol=0, atol=0)
    assert config["best_holdout_invariant_mse"] == pytest.approx(invariant_mse, rel=1e-6)
    assert config["holdout_reconstruction_mse"] == pytest.approx(reconstruction_mse, rel=1e-6)

    # The PCA baseline: per class, the error of the projection onto the top dim - k = 3 components.
    pca_error = 0.0
    for c in range(10):
        points = embeddings[labels == c].astype(np.float64)
        centred = points - points.mean(0)
        top = np.linalg.svd(centred, full_matrices=False)[2][:rank]
        pca_error += np.square(centred @ top.T @ top - centred).sum()
    expected_pca = pca_error / embeddings.size
    assert config["pca_reconstruction_mse"] == pytest.approx(expected_pca, rel=1e-3)
    assert config["reconstruction_vs_pca"] == pytest.approx(reconstruction_mse / expected_pca, rel=1e-3)


def test_stage_without_embeddings_names_the_stage_to_run(tmp_path):
    with pytest.raises(UserError, match="embeddings.npz"):
        train_cvpn(stage_params(tmp_path))


def test_a_stopped_training_resumes_after_its_last_epoch_to_the_same_model(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_cvpn_module, "CHECKPOINT_SECONDS", 0.0)  # a checkpoint every epoch
    rng = np.random.default_rng(0)
    embeddings, labels = rng.normal(size=(60, 6)).astype(np.float32), np.repeat(np.arange(10), 6)
    runs = {name: stage_params(tmp_path / name, "cvpn.epochs=5", "cvpn.holdout_fraction=0.2") for name in ("straight", "stopped")}
    for params in runs.values():
        save_arrays(layout_for(params).embeddings, embeddings=embeddings, labels=labels)
    train_cvpn(runs["straight"])

    def stop_in_epoch_4(metrics, step=None):
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_cvpn_module.tracking, "log_metrics", stop_in_epoch_4)
    with pytest.raises(KeyboardInterrupt):
        train_cvpn(runs["stopped"])
    layout = layout_for(runs["stopped"])
    assert not layout.cvpn.exists()
    assert sorted(p.name for p in layout.cvpn_checkpoints.iterdir()) == ["epoch_0003", "work-key.txt"]

    logged = []
    monkeypatch.setattr(train_cvpn_module.tracking, "log_metrics", lambda metrics, step=None: logged.append(step))
    config = train_cvpn(runs["stopped"])
    assert "train-cvpn: resuming after epoch 3" in capsys.readouterr().out
    assert logged[:2] == [4, 5]  # epochs 1-3 were not trained again
    straight = layout_for(runs["straight"]).cvpn
    assert json.loads((layout.cvpn / "config.json").read_text()) == json.loads((straight / "config.json").read_text()) == json.loads(json.dumps(config))
    assert (layout.cvpn / "model.safetensors").read_bytes() == (straight / "model.safetensors").read_bytes()
    assert not layout.cvpn_checkpoints.exists(), "the saved model leaves nothing to resume"


def test_checkpoints_of_other_settings_are_not_resumed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(train_cvpn_module, "CHECKPOINT_SECONDS", 0.0)
    rng = np.random.default_rng(0)
    embeddings, labels = rng.normal(size=(60, 6)).astype(np.float32), np.repeat(np.arange(10), 6)

    def stop_in_epoch_3(metrics, step=None):
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(train_cvpn_module.tracking, "log_metrics", stop_in_epoch_3)
    params = stage_params(tmp_path, "cvpn.epochs=5")
    save_arrays(layout_for(params).embeddings, embeddings=embeddings, labels=labels)
    with pytest.raises(KeyboardInterrupt):
        train_cvpn(params)
    assert (layout_for(params).cvpn_checkpoints / "epoch_0002").is_dir()
    monkeypatch.setattr(train_cvpn_module.tracking, "log_metrics", lambda metrics, step=None: None)
    train_cvpn(stage_params(tmp_path, "cvpn.epochs=5", "cvpn.lr=0.01"))
    assert "resuming" not in capsys.readouterr().out
