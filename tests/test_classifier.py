import dataclasses
import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from torch.nn import functional as F

from ncis import registry, tracking, train_classifier
from ncis.classifiers import build_classifier, eval_transform, load_classifier, outlier_transform, train_transform
from ncis.config import load_params
from ncis.datasets import get_benchmark, load_images, write_image_folder
from ncis.io import save_weights
from ncis.errors import UserError
from ncis.layout import layout_for
from ncis.train_classifier import (
    EnergyHead,
    MLPEnergyHead,
    ReversedEnergyHeadWarning,
    batch_loss,
    build_model,
    energy_regulariser,
    head_report,
    main,
    outlier_dataset,
    save_checkpoint,
)


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


@pytest.mark.parametrize("arch", list(registry.ARCHITECTURES))
@pytest.mark.parametrize("channels, size", [(1, 8), (3, 32)])
def test_forward_shapes(arch, channels, size):
    model = build_classifier(arch, num_classes=10, channels=channels).eval()
    with torch.no_grad():
        images = torch.rand(2, channels, size, size)
        features = model.features(images)
        assert model(images).shape == (2, 10)
    assert features.ndim == 2 and features.shape[0] == 2
    assert features.shape[1] == model.fc.in_features


def _conv(c_in: int, c_out: int, k: int) -> int:  # bias-free, as in both papers' networks
    return c_in * c_out * k * k


def _bn(c: int) -> int:  # scale and shift
    return 2 * c


def _resnet34_cifar_parameters(channels: int, classes: int) -> int:
    """He et al.'s ResNet-34 (basic blocks 3-4-6-3 at widths 64-512, a 1x1 conv + BN shortcut where
    the shape changes) with the CIFAR stem: one 3x3 conv, no max-pool; then the logits layer."""
    total, c_in = _conv(channels, 64, 3) + _bn(64), 64
    for width, blocks in zip((64, 128, 256, 512), (3, 4, 6, 3)):
        for _ in range(blocks):
            total += _conv(c_in, width, 3) + _bn(width) + _conv(width, width, 3) + _bn(width)
            total += _conv(c_in, width, 1) + _bn(width) if c_in != width else 0
            c_in = width
    return total + 512 * classes + classes


def _wrn_parameters(channels: int, classes: int, depth: int, widen: int) -> int:
    """Zagoruyko & Komodakis' WRN-depth-widen: a 3x3 conv to 16, three stages of (depth-4)/6
    pre-activation blocks (BN, 3x3 conv, BN, 3x3 conv; a bare 1x1 conv shortcut where the width
    changes), a last BN, then the logits layer."""
    total, c_in = _conv(channels, 16, 3), 16
    for width in (16 * widen, 32 * widen, 64 * widen):
        for _ in range((depth - 4) // 6):
            total += _bn(c_in) + _conv(c_in, width, 3) + _bn(width) + _conv(width, width, 3)
            total += _conv(c_in, width, 1) if c_in != width else 0
            c_in = width
    return total + _bn(c_in) + c_in * classes + classes


@pytest.mark.parametrize(
    "arch, classes, expected",
    [
        # The published sizes: ResNet-34 on CIFAR-100; WRN-40-2 on CIFAR-10 (Hendrycks' OE code:
        # 2,243,546) and on CIFAR-100 (90 more classes x 129).
        ("resnet34", 100, 21_328_292),
        ("wrn40_2", 10, 2_243_546),
        ("wrn40_2", 100, 2_255_156),
    ],
)
def test_paper_architectures_have_the_layer_by_layer_parameter_count(arch, classes, expected):
    counted = {"resnet34": _resnet34_cifar_parameters(3, classes), "wrn40_2": _wrn_parameters(3, classes, 40, 2)}[arch]
    assert counted == expected  # the counting above is the architecture the papers describe
    model = build_classifier(arch, num_classes=classes, channels=3)
    assert sum(p.numel() for p in model.parameters()) == expected
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == {"resnet34": 1 + 2 * 16 + 3, "wrn40_2": 1 + 2 * 18 + 3}[arch]
    assert convs[0].kernel_size == (3, 3) and convs[0].stride == (1, 1)  # the CIFAR stem: 32x32 kept


def test_an_unknown_architecture_is_refused_when_params_are_read():
    with pytest.raises(UserError, match=r"classifier.arch: .*unknown architecture 'vgg'.*resnet34"):
        load_params(overrides=["classifier.arch=vgg"])


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
    # The config records the params and the data it was trained on, not just whatever main returned.
    assert (config["arch"], config["num_classes"], config["channels"], config["image_size"]) == ("small_cnn", 10, 1, 8)
    expected_mean, expected_std = _numpy_channel_stats(load_images(layout.id_train)[0])
    np.testing.assert_allclose(config["mean"], expected_mean, rtol=1e-6)
    np.testing.assert_allclose(config["std"], expected_std, rtol=1e-6)

    checkpoints = sorted(p.name for p in layout.classifier_checkpoints.iterdir())
    assert checkpoints == ["epoch_0001", "epoch_0002", "work-key.txt"]  # the key: ncis/resume.py
    for checkpoint in layout.classifier_checkpoints.glob("epoch_*"):  # safetensors + JSON only: nothing to unpickle
        assert {p.name for p in checkpoint.iterdir()} == {"state.safetensors", "state.json"}
        tensors = load_file(str(checkpoint / "state.safetensors"))
        assert any(k.startswith("optimizer/") for k in tensors) and any(k.startswith("head/") for k in tensors)
        assert json.loads((checkpoint / "state.json").read_text())["epoch"] == int(checkpoint.name.split("_")[1])

    model, loaded = load_classifier(layout.classifier)
    assert loaded == config
    # The saved weights are the trained ones: they reproduce the logits of the last checkpoint's model.
    last = load_file(str(layout.classifier_checkpoints / "epoch_0002" / "state.safetensors"))
    in_memory = build_classifier("small_cnn", 10, 1, config["mean"], config["std"])
    in_memory.load_state_dict({k.removeprefix("model/"): v for k, v in last.items() if k.startswith("model/")})
    images = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.eval()(images)
        torch.testing.assert_close(logits, in_memory.eval()(images), rtol=0, atol=0)
        assert not torch.allclose(logits, build_classifier("small_cnn", 10, 1, config["mean"], config["std"]).eval()(images))


def _numpy_channel_stats(images: np.ndarray):
    """Per-channel mean and population std of uint8 [N, H, W, C] images scaled to [0, 1], by numpy alone."""
    pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255
    return pixels.mean(axis=0), pixels.std(axis=0)


def test_channel_stats_match_numpy_on_known_images(tmp_path, monkeypatch):
    rng = np.random.default_rng(3)
    images = rng.integers(0, 256, (7, 5, 5, 3), dtype=np.uint8)
    images[..., 2] = 200  # a constant channel: std clamped to 1e-3, not 0
    write_image_folder(tmp_path / "rgb", images, np.array([0, 0, 1, 1, 1, 2, 2]))
    benchmark = dataclasses.replace(get_benchmark("digits"), channels=3, image_size=5)
    dataset = train_classifier.open_images(tmp_path / "rgb", eval_transform(benchmark), "prepare")
    mean, std = train_classifier.channel_stats(dataset, seed=0, device=torch.device("cpu"))
    expected_mean, expected_std = _numpy_channel_stats(images)  # labels sorted: the file order is the write order
    np.testing.assert_allclose(mean, expected_mean, rtol=1e-6)  # ToTensor is float32
    np.testing.assert_allclose(std[:2], expected_std[:2], rtol=1e-5)
    assert expected_mean[2] == pytest.approx(200 / 255) and std[2] == pytest.approx(1e-3)

    # Over the cap, the stats are those of the seeded subset (the same subset for the same seed).
    monkeypatch.setattr(train_classifier, "NORMALISATION_IMAGES", 4)
    keep = torch.randperm(7, generator=torch.Generator().manual_seed(5))[:4].tolist()
    subset_mean, subset_std = train_classifier.channel_stats(dataset, seed=5, device=torch.device("cpu"))
    expected_mean, expected_std = _numpy_channel_stats(images[keep])
    np.testing.assert_allclose(subset_mean, expected_mean, rtol=1e-6)
    np.testing.assert_allclose(subset_std[:2], expected_std[:2], rtol=1e-5)
    assert not np.allclose(subset_mean[:2], mean[:2])


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


def test_more_epochs_are_refused_and_changed_settings_restart(tmp_path, logged_steps):
    make_tiny_data(tmp_path)
    main(tiny_params(tmp_path, epochs=2))
    layout = layout_for(tiny_params(tmp_path))
    # Resuming a 2-epoch run for 3 epochs would stretch a cosine schedule planned over 2 mid-way.
    with pytest.raises(UserError, match=r"2-epoch run.*classifier.epochs=2.*delete") as refused:
        main(tiny_params(tmp_path, epochs=3))
    assert "\n" not in str(refused.value)
    assert logged_steps == [1, 2]  # nothing trained
    assert sorted(p.name for p in layout.classifier_checkpoints.glob("epoch_*")) == ["epoch_0001", "epoch_0002"]
    assert main(tiny_params(tmp_path, epochs=2))["train_stats"]  # finished: weights rewritten from the checkpoint
    assert logged_steps == [1, 2]
    main(tiny_params(tmp_path, epochs=1, lr=0.01))  # another run: its checkpoints don't apply
    assert logged_steps[2:] == [1]
    assert sorted(p.name for p in layout.classifier_checkpoints.glob("epoch_*")) == ["epoch_0001"]
    regenerated = next(layout.synthetic_images.rglob("*.png"))
    os.utime(regenerated, ns=(0, regenerated.stat().st_mtime_ns + 10**9))  # new outliers, same count
    main(tiny_params(tmp_path, epochs=1, lr=0.01))
    assert logged_steps[3:] == [1]


def test_checkpoint_pruning_keeps_the_configured_number(tmp_path, logged_steps):
    model, head = build_classifier("small_cnn", 10, 1), EnergyHead(monotone=False)
    optimizer = torch.optim.SGD([*model.parameters(), *head.parameters()], lr=0.1, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=10)
    for epoch in range(1, 6):
        save_checkpoint(tmp_path, epoch, model, head, optimizer, scheduler, {}, keep=3)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["epoch_0003", "epoch_0004", "epoch_0005"]

    make_tiny_data(tmp_path / "run")
    main(tiny_params(tmp_path / "run", epochs=3, keep_checkpoints=1))
    assert [p.name for p in (tmp_path / "run" / "classifier_checkpoints").glob("epoch_*")] == ["epoch_0003"]


def test_energy_weight_zero_leaves_the_cross_entropy_alone():
    torch.manual_seed(0)
    model, head = build_classifier("small_cnn", 10, 1).train(), EnergyHead(monotone=False)
    images, outliers, labels = torch.rand(6, 1, 8, 8), torch.rand(4, 1, 8, 8), torch.arange(6)

    def loss_and_gradient(weight):
        model.zero_grad()
        head.zero_grad()
        loss, logits = batch_loss(model, head, images, labels, outliers, weight)
        loss.backward()
        assert logits.shape == (10, 10)  # ID and outliers in one pass
        return loss.item(), torch.cat([p.grad.flatten() for p in model.parameters()]), head.raw_weight.grad

    cross_entropy, cross_entropy_gradient, head_gradient = loss_and_gradient(0.0)
    model.zero_grad()
    expected = F.cross_entropy(model(torch.cat([images, outliers]))[:6], labels)
    expected.backward()
    assert cross_entropy == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(cross_entropy_gradient, torch.cat([p.grad.flatten() for p in model.parameters()]))
    assert head_gradient is None or head_gradient.abs().item() == 0
    regularised, regularised_gradient, _ = loss_and_gradient(1.0)
    assert regularised > cross_entropy and not torch.allclose(regularised_gradient, cross_entropy_gradient)


def test_mlp_head_is_the_two_class_cross_entropy_of_a_1_hidden_2_network():
    head = MLPEnergyHead(hidden=512)
    assert [tuple(p.shape) for p in head.parameters()] == [(512, 1), (512,), (2, 512), (2,)]
    id_energy, outlier_energy = torch.randn(5) + 2, torch.randn(3)
    two_class = F.cross_entropy(head.layers(torch.cat([id_energy, outlier_energy])[:, None]), torch.tensor([1] * 5 + [0] * 3))
    torch.testing.assert_close(energy_regulariser(head, id_energy, outlier_energy), two_class)


def test_max_outliers_caps_the_outlier_set_with_a_seeded_subset(tmp_path):
    make_tiny_data(tmp_path)  # 12 synthetic outliers

    def chosen(max_outliers, seed=0):
        params = load_params(overrides=[f"outputs={tmp_path}", f"seed={seed}", f"classifier.max_outliers={max_outliers}"])
        dataset = outlier_dataset(params.classifier, params.seed, layout_for(params), get_benchmark("digits"))
        return list(dataset.indices) if hasattr(dataset, "indices") else list(range(len(dataset)))

    assert len(chosen(5)) == 5 and len(set(chosen(5))) == 5
    assert chosen(5) == chosen(5) and chosen(5) != chosen(5, seed=1)
    assert chosen(0) == chosen(50) == list(range(12))  # 0 = all


def test_resized_crop_augmentation_gives_the_benchmark_size():
    from PIL import Image

    benchmark = get_benchmark("digits")
    transform = train_transform(benchmark, "resized_crop")
    assert any(type(step).__name__ == "RandomResizedCrop" for step in transform.transforms)
    assert outlier_transform(benchmark, "resized_crop")(Image.new("L", (20, 30))).shape == (1, 8, 8)
    assert not any(type(step).__name__ == "RandomResizedCrop" for step in train_transform(benchmark).transforms)


def test_resized_crops_come_from_the_originals_where_the_benchmark_keeps_them(tmp_path, monkeypatch, logged_steps):
    make_tiny_data(tmp_path, outliers=False)
    layout = layout_for(tiny_params(tmp_path))
    rng = np.random.default_rng(1)
    write_image_folder(layout.id_train_originals, rng.integers(0, 256, (40, 12, 10, 1), dtype=np.uint8), np.repeat(np.arange(10), 4))
    opened = []
    real_open = train_classifier.open_images
    monkeypatch.setattr(train_classifier, "open_images", lambda folder, *args: opened.append(folder) or real_open(folder, *args))
    keeping = dataclasses.replace(get_benchmark("digits"), keeps_originals=True)
    monkeypatch.setattr(train_classifier, "get_benchmark", lambda name: keeping)
    main(tiny_params(tmp_path, epochs=1, outliers="none", augment="resized_crop"))
    assert opened[0] == layout.id_train_originals
    opened.clear()
    main(tiny_params(tmp_path, epochs=1, outliers="none", augment="crop"))
    assert opened[0] == layout.id_train and layout.id_train_originals not in opened


def test_init_starts_from_a_saved_classifier_and_refuses_mismatches(tmp_path, logged_steps):
    make_tiny_data(tmp_path / "ce")
    first = main(tiny_params(tmp_path / "ce", epochs=1, outliers="none"))
    init = tmp_path / "cross_entropy"
    shutil.copytree(tmp_path / "ce" / "classifier", init)

    make_tiny_data(tmp_path / "ft")
    params = tiny_params(tmp_path / "ft", epochs=2, init=str(init), energy_weight=1.0, lr_min=0.01)
    model, mean, std = build_model(params.classifier, params.seed, layout_for(params), get_benchmark("digits"), torch.device("cpu"))
    reference, _ = load_classifier(init)
    images = torch.rand(4, 1, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(model.eval()(images), reference(images), rtol=0, atol=0)  # equal logits before training
    assert (mean, std) == (first["mean"], first["std"])
    fine_tuned = main(params)
    assert fine_tuned["mean"] == first["mean"] and fine_tuned["energy_head"]["energy_weight"] == 1.0
    assert fine_tuned["train_stats"]["train/lr"] == pytest.approx(0.01)  # the cosine ends at lr_min
    tuned, _ = load_classifier(tmp_path / "ft" / "classifier")
    with torch.no_grad():
        assert not torch.allclose(tuned(images), reference(images))

    other_arch = tmp_path / "wrn"
    save_weights(other_arch, build_classifier("wrn40_2", 10, 1), {**first, "arch": "wrn40_2"})
    other_classes = tmp_path / "five"
    save_weights(other_classes, build_classifier("small_cnn", 5, 1), {**first, "num_classes": 5})
    for folder, why in [(other_arch, "wrn40_2"), (other_classes, "'num_classes': 5"), (tmp_path / "nothing", "holds no classifier")]:
        with pytest.raises(UserError, match=why) as refused:
            main(tiny_params(tmp_path / "ft", init=str(folder)))
        assert "\n" not in str(refused.value) and "classifier.init" in str(refused.value)
    with pytest.raises(UserError, match="rewrites"):
        main(tiny_params(tmp_path / "ft", init=str(tmp_path / "ft" / "classifier")))


def test_baseline_and_noise_outliers_need_no_synthetic_images(tmp_path, logged_steps):
    make_tiny_data(tmp_path, outliers=False)
    with pytest.raises(UserError, match="synthesize"):
        main(tiny_params(tmp_path))
    assert main(tiny_params(tmp_path, epochs=1, outliers="none"))["energy_head"] is None
    assert "weight" in main(tiny_params(tmp_path, epochs=1, outliers="noise"))["energy_head"]


def test_noise_outliers_are_drawn_noise_images_that_the_energy_term_trains_on(tmp_path, logged_steps, monkeypatch):
    """`classifier.outliers=noise`: every step's outlier batch is max_outliers fixed noise images,
    Gaussian (clamped to [0, 1]) and uniform alike, and the energy regulariser on them is in the loss."""
    make_tiny_data(tmp_path, outliers=False)
    seen, regulariser = [], []
    real_loss = train_classifier.batch_loss

    def recording(model, head, images, labels, outlier_images, energy_weight):
        loss, logits = real_loss(model, head, images, labels, outlier_images, energy_weight)
        seen.append(None if outlier_images is None else outlier_images.detach().clone())
        regulariser.append(float(loss.detach() - F.cross_entropy(logits[: len(images)].detach(), labels)))
        return loss, logits

    monkeypatch.setattr(train_classifier, "batch_loss", recording)
    main(tiny_params(tmp_path, epochs=1, outliers="noise", outlier_batch_size=4, max_outliers=6, energy_weight=0.5))
    assert len(seen) == 5 and all(batch is not None and batch.shape == (4, 1, 8, 8) for batch in seen)  # 40 ID images / 8
    images = torch.cat(seen)
    distinct = torch.unique(images.flatten(1), dim=0)
    assert len(distinct) == 6  # 20 draws, cycling through the 6 fixed images
    assert images.min() >= 0 and images.max() <= 1
    clamped = ((distinct == 0) | (distinct == 1)).any(dim=1)  # N(0.5, 0.5^2) leaves ~1/3 of pixels outside [0, 1]
    assert clamped.sum() == 3, "half Gaussian, half uniform"
    uniform = distinct[~clamped]
    assert ((uniform > 0) & (uniform < 1)).all() and abs(uniform.mean() - 0.5) < 0.1 and abs(uniform.std() - 12**-0.5) < 0.05
    assert all(term > 1e-4 for term in regulariser)  # the energy term: outlier batches count in the loss


def test_missing_id_data_names_prepare(tmp_path):
    with pytest.raises(UserError, match="ncis prepare"):
        main(tiny_params(tmp_path))
