"""Benchmark data preparation: digits for real, CIFAR-100 / ImageNet-100 on tiny fakes."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ncis.config import load_params
from ncis.datasets import get_benchmark, image_folder, load_images, write_image_folder
from ncis.datasets import digits as digits_module
from ncis.errors import UserError
from ncis.layout import layout_for

OOD_SIZE = 60


def prepare(outputs: Path, *overrides: str):
    params = load_params(overrides=[f"outputs={outputs}", f"data.ood_size={OOD_SIZE}", *overrides])
    layout = layout_for(params)
    get_benchmark(params.benchmark).prepare_data(params, layout)
    return params, layout


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    params, layout = prepare(tmp_path_factory.mktemp("digits"))
    train = load_images(layout.id_train, channels=1)
    test = load_images(layout.id_test, channels=1)
    ood = {name: load_images(layout.ood(name), channels=1)[0] for name in get_benchmark("digits").ood_sets}
    return params, layout, train, test, ood


# --- digits ---------------------------------------------------------------------------------


def test_digits_images_are_8x8_grayscale_on_the_digits_17_levels(digits):
    _, _, (train_x, _), (test_x, _), ood = digits
    levels = set(np.round(np.arange(17) * 255 / 16).astype(np.uint8).tolist())
    for images in [train_x, test_x, *ood.values()]:
        assert images.dtype == np.uint8 and images.shape[1:] == (8, 8, 1)
        assert set(np.unique(images).tolist()) <= levels
    assert train_x.min() == 0 and train_x.max() == 255
    assert len(train_x) + len(test_x) == 1797


def test_digits_split_is_stratified_and_covers_every_class(digits):
    params, _, (_, train_y), (_, test_y), _ = digits
    train_counts, test_counts = np.bincount(train_y, minlength=10), np.bincount(test_y, minlength=10)
    assert (train_counts > 0).all() and (test_counts > 0).all() and len(train_counts) == len(test_counts) == 10
    expected = (train_counts + test_counts) * params.data.test_fraction
    assert np.abs(test_counts - expected).max() <= 1


def test_digits_train_and_test_share_no_image(digits):
    _, _, (train_x, _), (test_x, _), _ = digits
    train_rows = {row.tobytes() for row in train_x.reshape(len(train_x), -1)}
    test_rows = {row.tobytes() for row in test_x.reshape(len(test_x), -1)}
    assert not train_rows & test_rows
    assert len(train_rows) + len(test_rows) == 1797  # the bundled digits hold no duplicates


def test_digits_ood_sets_have_ood_size_images_in_class_folder_0(digits):
    _, layout, _, _, ood = digits
    assert sorted(ood) == ["letters", "noise", "photos", "textures"]
    for name, images in ood.items():
        assert len(images) == OOD_SIZE
        assert [p.name for p in layout.ood(name).iterdir()] == ["0"]


@pytest.mark.parametrize("name", ["letters", "photos", "textures", "noise"])
def test_digits_ood_sets_are_told_apart_from_id(digits, name):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    _, _, (train_x, _), (test_x, _), ood = digits
    images, half = ood[name], OOD_SIZE // 2
    flat = lambda x: x.reshape(len(x), -1) / 255.0  # noqa: E731
    fit_x = np.concatenate([flat(train_x), flat(images[:half])])
    fit_y = np.r_[np.zeros(len(train_x)), np.ones(half)]
    detector = LogisticRegression(max_iter=1000, class_weight="balanced").fit(fit_x, fit_y)
    scores = detector.decision_function(np.concatenate([flat(test_x), flat(images[half:])]))
    assert roc_auc_score(np.r_[np.zeros(len(test_x)), np.ones(OOD_SIZE - half)], scores) > 0.9


def test_digits_letters_are_styled_like_the_digits(digits):
    # Bright strokes on a black background with about the digits' amount of ink, so that
    # "near" is about shape, not brightness.
    _, _, (train_x, _), _, ood = digits
    letters = ood["letters"].astype(np.float64)
    assert abs(letters.mean() - train_x.mean()) < 0.25 * train_x.mean()
    assert letters[:, :, [0, -1]].mean() < 0.3 * letters.mean()  # outer columns are background


def test_digits_prepare_is_deterministic_for_a_seed(digits, tmp_path):
    _, layout, _, _, _ = digits
    _, again = prepare(tmp_path / "same")
    assert folder_bytes(again.data) == folder_bytes(layout.data)
    _, other = prepare(tmp_path / "other", "seed=1")
    for folder in ["train", "test", "ood/letters", "ood/photos", "ood/textures", "ood/noise"]:
        assert folder_bytes(other.data / folder) != folder_bytes(layout.data / folder)


def test_interrupted_digits_prepare_leaves_no_partial_data(tmp_path, monkeypatch):
    def broken(rng, count):
        raise RuntimeError("interrupted")

    # `noise` is written last, so everything else is already on disk when it fails.
    monkeypatch.setitem(digits_module.OOD_GENERATORS, "noise", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        prepare(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither `data` nor a temporary folder

    monkeypatch.undo()
    _, layout = prepare(tmp_path)
    before = folder_bytes(layout.data)
    monkeypatch.setitem(digits_module.OOD_GENERATORS, "noise", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        prepare(tmp_path, "seed=1")
    assert folder_bytes(layout.data) == before
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


def test_image_folder_sorts_class_10_after_9(tmp_path):
    for label in range(12):
        (tmp_path / str(label)).mkdir()
        Image.new("L", (2, 2), label).save(tmp_path / str(label) / "0.png")
    dataset = image_folder(tmp_path)
    assert dataset.classes == [str(i) for i in range(12)]
    assert dataset.class_to_idx == {str(i): i for i in range(12)}
    # Every image gets its own folder's index (each image's pixel value is its label).
    assert sorted((int(np.asarray(Image.open(path))[0, 0]), target) for path, target in dataset.samples) == [(i, i) for i in range(12)]


def test_image_folder_reads_files_in_the_order_written(tmp_path):
    write_image_folder(tmp_path, np.arange(24, dtype=np.uint8).reshape(24, 1, 1, 1), np.repeat([0, 11], 12))
    dataset = image_folder(tmp_path)
    assert [Path(path).name for path, _ in dataset.samples[:12]] == [f"{n}.png" for n in range(12)]
    assert dataset.targets == [0] * 12 + [11] * 12


# --- CIFAR-100 and ImageNet-100 --------------------------------------------------------------


@pytest.mark.parametrize("benchmark", ["cifar100", "imagenet100"])
def test_real_benchmarks_name_the_missing_data(tmp_path, benchmark):
    missing = tmp_path / "nowhere"
    with pytest.raises(UserError, match=str(missing)):
        prepare(tmp_path / "out", f"benchmark={benchmark}", f"data.root={missing}")
    with pytest.raises(UserError, match="data.root"):
        prepare(tmp_path / "out", f"benchmark={benchmark}")
    assert not (tmp_path / "out" / "data").exists()


def test_real_benchmark_class_names_read_as_prompts():
    for name in ["cifar100", "imagenet100"]:
        benchmark = get_benchmark(name)
        assert benchmark.num_classes == len(set(benchmark.class_names)) == 100
        assert not any("_" in label for label in benchmark.class_names)
    assert get_benchmark("cifar100").class_names[1] == "aquarium fish"


def write_ood_folders(root: Path, folders: list[str]) -> None:
    """Two RGB images of odd sizes per folder, one nested, as the real releases have."""
    rng = np.random.default_rng(0)
    for folder in folders:
        (root / folder / "sub").mkdir(parents=True)
        Image.fromarray(rng.integers(0, 256, (40, 50, 3), dtype=np.uint8)).save(root / folder / "a.jpg")
        Image.fromarray(rng.integers(0, 256, (36, 36, 3), dtype=np.uint8)).save(root / folder / "sub" / "b.png")


def test_cifar100_prepare_on_a_tiny_fake_release(tmp_path, monkeypatch):
    import scipy.io
    import torchvision.datasets.cifar
    import torchvision.datasets.svhn

    from ncis.datasets.cifar100 import CIFAR100_LABELS

    # The fake files cannot match the real md5 sums torchvision checks.
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", lambda *args, **kwargs: True)
    root, rng = tmp_path / "datasets", np.random.default_rng(0)
    cifar = root / "cifar-100-python"
    cifar.mkdir(parents=True)
    for split, count in [("train", 6), ("test", 3)]:
        entry = {"data": rng.integers(0, 256, (count, 3 * 32 * 32), dtype=np.uint8), "fine_labels": [0, 1, 99] * (count // 3)}
        (cifar / split).write_bytes(pickle.dumps(entry))
    (cifar / "meta").write_bytes(pickle.dumps({"fine_label_names": list(CIFAR100_LABELS)}))
    (root / "svhn").mkdir()
    svhn = {"X": rng.integers(0, 256, (32, 32, 3, 4), dtype=np.uint8), "y": np.array([[1], [2], [10], [3]])}
    scipy.io.savemat(root / "svhn" / "test_32x32.mat", svhn)
    write_ood_folders(root, ["places365", "LSUN", "iSUN", "dtd/images"])

    _, layout = prepare(tmp_path / "out", "benchmark=cifar100", f"data.root={root}")
    train_x, train_y = load_images(layout.id_train)
    assert train_x.shape == (6, 32, 32, 3) and sorted(train_y.tolist()) == [0, 0, 1, 1, 99, 99]
    assert load_images(layout.id_test)[0].shape == (3, 32, 32, 3)
    assert load_images(layout.ood("svhn"))[0].shape == (4, 32, 32, 3)
    for name in ["places365", "lsun", "isun", "textures"]:
        assert load_images(layout.ood(name))[0].shape == (2, 32, 32, 3)


def test_imagenet100_prepare_on_a_tiny_fake_release(tmp_path):
    from ncis.datasets.imagenet100 import CLASSES

    root = tmp_path / "datasets"
    image = Image.new("RGB", (30, 20), (200, 10, 10))
    for split in ["train", "val"]:
        for wnid in CLASSES:
            (root / "imagenet" / split / wnid).mkdir(parents=True)
            image.save(root / "imagenet" / split / wnid / f"{wnid}_1.JPEG")
    (root / "imagenet" / "train" / "n99999999").mkdir()  # an ImageNet-1k class outside the subset
    image.save(root / "imagenet" / "train" / "n99999999" / "x.JPEG")

    with pytest.raises(UserError, match="iNaturalist"):
        prepare(tmp_path / "out", "benchmark=imagenet100", f"data.root={root}")
    write_ood_folders(root, ["iNaturalist", "SUN", "Places", "dtd/images"])
    _, layout = prepare(tmp_path / "out", "benchmark=imagenet100", f"data.root={root}")
    dataset = image_folder(layout.id_train)
    assert sorted(dataset.targets) == list(range(100))  # one image per subset class, none from n99999999
    with Image.open(dataset.samples[0][0]) as first:
        assert first.size == (224, 224)
    assert len(image_folder(layout.id_test)) == 100
    assert all(len(image_folder(layout.ood(name))) == 2 for name in ["inaturalist", "sun", "places", "textures"])
