import json
import os

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ncis import tracking
from ncis.classifiers import build_classifier, load_classifier
from ncis.config import load_params
from ncis.datasets import write_image_folder
from ncis.errors import UserError
from ncis.layout import layout_for
from ncis.train_classifier import EnergyHead, ReversedEnergyHeadWarning, energy_regulariser, head_report, main


def make_tiny_data(root, outliers: bool = True) -> None:
    """40 ID images (4 per digit class) of 8x8x1, and 12 synthetic outliers at 16x16."""
    rng = np.random.default_rng(0)
    layout = layout_for(load_params(overrides=[f"outputs={root}"]))
    labels = np.repeat(np.arange(10), 4)
    images = (rng.random((40, 8, 8, 1)) * 64 + labels[:, None, None, None] * 19).astype(np.uint8)
    write_image_folder(layout.id_train, images, labels)
    if outliers:
        write_image_folder(layout.synthetic_images, rng.integers(0, 256, (12, 16, 16, 1), dtype=np.uint8), np.arange(12) % 10)


def tiny_params(root, **classifier):
    settings = {"arch": "small_cnn", "epochs": 2, "lr": 0.05, "batch_size": 8, "outlier_batch_size": 8, "max_outliers": 10}
    return load_params(overrides=[f"outputs={root}", "device=cpu", *(f"classifier.{k}={v}" for k, v in {**settings, **classifier}.items())])


@pytest.fixture
def logged_steps(monkeypatch):
    steps = []
    monkeypatch.setattr(tracking, "log_metrics", lambda metrics, step=None: steps.append(step))
    return steps


@pytest.mark.parametrize("arch", ["small_cnn", "wrn40_2", "resnet34"])
@pytest.mark.parametrize("channels, size", [(1, 8), (3, 32)])
def test_forward_shapes(arch, channels, size):
    model = build_classifier(arch, num_classes=10, channels=channels).eval()
    with torch.no_grad():
        images = torch.rand(2, channels, size, size)
        features = model.features(images)
        assert model(images).shape == (2, 10)
    assert features.ndim == 2 and features.shape[0] == 2
    assert features.shape[1] == model.fc.in_features


def _fit_head(monotone: bool, id_energy, outlier_energy, steps: int = 300) -> EnergyHead:
    head = EnergyHead(monotone)
    optimizer = torch.optim.SGD(head.parameters(), lr=0.5)
    for _ in range(steps):
        optimizer.zero_grad()
        energy_regulariser(head, id_energy, outlier_energy).backward()
        optimizer.step()
    return head


def test_monotone_head_stays_non_decreasing_where_the_free_head_reverses(recwarn):
    generator = torch.Generator().manual_seed(0)
    # Outliers with HIGHER energy than ID: the case where a free head learns a negative weight.
    id_energy = torch.randn(200, generator=generator)
    outlier_energy = torch.randn(200, generator=generator) + 3

    free = _fit_head(False, id_energy, outlier_energy)
    assert free.weight.item() < 0
    with pytest.warns(ReversedEnergyHeadWarning):
        report = head_report(free, id_energy, outlier_energy, epoch=1)
    assert report["energy_head/reversed"] == 1.0 and report["energy_head/auroc"] < 0.5

    monotone = _fit_head(True, id_energy, outlier_energy)
    grid = torch.linspace(-10, 10, 201)
    with torch.no_grad():
        p_id = torch.sigmoid(monotone(grid)).numpy()
    assert monotone.weight.item() >= 0
    assert np.all(np.diff(p_id) >= 0)
    recwarn.clear()
    assert head_report(monotone, id_energy, outlier_energy, epoch=1)["energy_head/reversed"] == 0.0
    assert not [w for w in recwarn if issubclass(w.category, ReversedEnergyHeadWarning)]


def test_train_classifier_writes_weights_and_per_epoch_checkpoints(tmp_path, logged_steps):
    make_tiny_data(tmp_path)
    params = tiny_params(tmp_path)
    config = main(params)
    layout = layout_for(params)

    assert logged_steps == [1, 2]
    assert {p.name for p in layout.classifier.iterdir()} == {"model.safetensors", "config.json"}
    for key in ("arch", "num_classes", "channels", "image_size", "mean", "std", "energy_head", "outliers", "train_stats"):
        assert key in config
    assert set(config["energy_head"]) >= {"mode", "weight", "bias"}
    assert json.loads((layout.classifier / "config.json").read_text()) == config

    checkpoints = sorted(p.name for p in layout.classifier_checkpoints.iterdir())
    assert checkpoints == ["epoch_0001", "epoch_0002"]
    for checkpoint in layout.classifier_checkpoints.iterdir():  # safetensors + JSON only: nothing to unpickle
        assert {p.name for p in checkpoint.iterdir()} == {"state.safetensors", "state.json"}
        tensors = load_file(str(checkpoint / "state.safetensors"))
        assert any(k.startswith("optimizer/") for k in tensors) and any(k.startswith("head/") for k in tensors)
        assert json.loads((checkpoint / "state.json").read_text())["epoch"] == int(checkpoint.name.split("_")[1])

    model, loaded = load_classifier(layout.classifier)
    assert loaded == config
    assert model(torch.rand(3, 1, 8, 8)).shape == (3, 10)


def test_interrupted_run_resumes_and_matches_an_uninterrupted_one(tmp_path, monkeypatch):
    for name in ("straight", "interrupted"):
        make_tiny_data(tmp_path / name)
    main(tiny_params(tmp_path / "straight", epochs=3))

    def stop_at_epoch_3(metrics, step=None):
        if step == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(tracking, "log_metrics", stop_at_epoch_3)
    with pytest.raises(KeyboardInterrupt):
        main(tiny_params(tmp_path / "interrupted", epochs=3))
    assert not layout_for(tiny_params(tmp_path / "interrupted")).classifier.exists()

    steps = []
    monkeypatch.setattr(tracking, "log_metrics", lambda metrics, step=None: steps.append(step))
    main(tiny_params(tmp_path / "interrupted", epochs=3))
    assert steps == [3]
    straight = load_file(str(tmp_path / "straight" / "classifier" / "model.safetensors"))
    resumed = load_file(str(tmp_path / "interrupted" / "classifier" / "model.safetensors"))
    assert straight.keys() == resumed.keys()
    for key in straight:
        torch.testing.assert_close(resumed[key], straight[key], rtol=1e-5, atol=1e-6)  # bit-identical in practice


def test_more_epochs_continue_and_changed_settings_restart(tmp_path, logged_steps):
    make_tiny_data(tmp_path)
    main(tiny_params(tmp_path, epochs=2))
    main(tiny_params(tmp_path, epochs=3))
    assert logged_steps == [1, 2, 3]  # the second run trained epoch 3 only
    assert main(tiny_params(tmp_path, epochs=3))["train_stats"]  # finished: weights rewritten from the checkpoint
    assert logged_steps == [1, 2, 3]
    main(tiny_params(tmp_path, epochs=1, lr=0.01))  # another run: its checkpoints don't apply
    assert logged_steps[3:] == [1]
    layout = layout_for(tiny_params(tmp_path))
    assert sorted(p.name for p in layout.classifier_checkpoints.iterdir()) == ["epoch_0001"]
    regenerated = next(layout.synthetic_images.rglob("*.png"))
    os.utime(regenerated, ns=(0, regenerated.stat().st_mtime_ns + 10**9))  # new outliers, same count
    main(tiny_params(tmp_path, epochs=1, lr=0.01))
    assert logged_steps[4:] == [1]


def test_baseline_and_noise_outliers_need_no_synthetic_images(tmp_path, logged_steps):
    make_tiny_data(tmp_path, outliers=False)
    with pytest.raises(UserError, match="synthesize"):
        main(tiny_params(tmp_path))
    assert main(tiny_params(tmp_path, epochs=1, outliers="none"))["energy_head"] is None
    assert "weight" in main(tiny_params(tmp_path, epochs=1, outliers="noise"))["energy_head"]


def test_missing_id_data_names_prepare(tmp_path):
    with pytest.raises(UserError, match="ncis prepare"):
        main(tiny_params(tmp_path))
