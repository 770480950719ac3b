"""Benchmark data preparation: CIFAR-100 / ImageNet-100 on tiny fakes, and the image folders every benchmark uses
(digits: tests/test_digits.py)."""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ncis.config import load_params
from ncis.datasets import get_benchmark, image_folder, load_images, prompt_words, write_image_folder
from ncis.errors import UserError
from ncis.layout import layout_for

OOD_SIZE = 60


def prepare(outputs: Path, *overrides: str):
    params = load_params(overrides=[f"outputs={outputs}", f"data.ood_size={OOD_SIZE}", *overrides])
    layout = layout_for(params)
    get_benchmark(params.benchmark).prepare_data(params, layout)
    return params, layout


# --- image folders (digits itself: tests/test_digits.py) -------------------------------------


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


def write_fake_cifar100(root: Path, train_labels: list[int], test_labels: list[int], seed: int = 0) -> dict[str, np.ndarray]:
    """CIFAR-100's python version as the release has it: Python 2 era pickles (protocol 2) of
    dicts holding a uint8 [N, 3072] array (1024 red, 1024 green, 1024 blue values, row-major)."""
    from ncis.datasets.cifar100 import CIFAR100_LABELS

    rng, data = np.random.default_rng(seed), {}
    (root / "cifar-100-python").mkdir(parents=True)
    for split, labels in [("train", train_labels), ("test", test_labels)]:
        data[split] = rng.integers(0, 256, (len(labels), 3 * 32 * 32), dtype=np.uint8)
        entry = {"data": data[split], "fine_labels": list(labels), "coarse_labels": [0] * len(labels)}
        # numpy 1's name for the array constructor, as the release (pickled long before numpy 2) has it
        pickled = pickle.dumps(entry, protocol=2).replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
        (root / "cifar-100-python" / split).write_bytes(pickled)
    meta = {"fine_label_names": list(CIFAR100_LABELS), "coarse_label_names": ["x"] * 20}
    (root / "cifar-100-python" / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    return data


def svhn_pattern(count: int) -> np.ndarray:
    """SVHN's .mat layout [H, W, C, N], every pixel distinct within its image and no image symmetric:
    a height/width swap, a channel flip or an image reordering all change the pixels."""
    h, w, c, n = np.meshgrid(np.arange(32), np.arange(32), np.arange(3), np.arange(count), indexing="ij")
    return ((h * 32 + w + 85 * c + 37 * n) % 256).astype(np.uint8) ^ (h * 3 % 7).astype(np.uint8)


@pytest.fixture
def fake_release_checks(monkeypatch):
    """The fake files cannot match the real md5 sums checked before reading."""
    import torchvision.datasets.svhn
    import torchvision.datasets.utils

    monkeypatch.setattr(torchvision.datasets.utils, "check_integrity", lambda *args, **kwargs: True)
    monkeypatch.setattr(torchvision.datasets.svhn, "check_integrity", lambda *args, **kwargs: True)


def write_fake_cifar100_benchmark(root: Path, train_labels=(0, 1, 99, 0, 1, 99), test_labels=(5, 0, 5)) -> tuple[dict, np.ndarray]:
    import scipy.io

    data = write_fake_cifar100(root, list(train_labels), list(test_labels))
    svhn = svhn_pattern(4)
    (root / "svhn").mkdir()
    scipy.io.savemat(root / "svhn" / "test_32x32.mat", {"X": svhn, "y": np.array([[1], [2], [10], [3]])})
    write_ood_folders(root, ["places365", "LSUN", "iSUN", "dtd/images"])
    return data, svhn


def cifar_rows_as_images(rows: np.ndarray) -> np.ndarray:
    """The CIFAR row format, decoded independently of ncis: channel planes, each 32 rows of 32."""
    images = np.zeros((len(rows), 32, 32, 3), np.uint8)
    for n, row in enumerate(rows):
        for channel in range(3):
            for y in range(32):
                images[n, y, :, channel] = row[channel * 1024 + y * 32 : channel * 1024 + (y + 1) * 32]
    return images


def test_cifar100_prepare_on_a_tiny_fake_release(tmp_path, fake_release_checks):
    root = tmp_path / "datasets"
    train_labels, test_labels = [0, 1, 99, 0, 1, 99], [5, 0, 5]
    data, svhn = write_fake_cifar100_benchmark(root, train_labels, test_labels)

    _, layout = prepare(tmp_path / "out", "benchmark=cifar100", f"data.root={root}")
    for folder, split, labels in [(layout.id_train, "train", train_labels), (layout.id_test, "test", test_labels)]:
        images, written_labels = load_images(folder)
        # Written per class in release order: class 0's images first, then class 1's, ...
        order = np.argsort(labels, kind="stable")
        assert written_labels.tolist() == np.asarray(labels)[order].tolist()
        np.testing.assert_array_equal(images, cifar_rows_as_images(data[split])[order])
    ood_svhn, _ = load_images(layout.ood("svhn"))
    np.testing.assert_array_equal(ood_svhn, svhn.transpose(3, 0, 1, 2))  # [H, W, C, N] -> [N, H, W, C]
    for name in ["places365", "lsun", "isun", "textures"]:
        assert load_images(layout.ood(name))[0].shape == (2, 32, 32, 3)
    assert not layout.id_train_originals.exists()  # the stored PNGs are CIFAR's originals


class RunsCode:
    """What a crafted pickle does: name a callable (here `exec`) that unpickling calls."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


@pytest.mark.parametrize("where", ["meta", "train", "inside an object array"])
def test_cifar100_files_run_no_code_they_name(tmp_path, fake_release_checks, where):
    root, marker = tmp_path / "datasets", tmp_path / "executed"
    write_fake_cifar100_benchmark(root)
    file = "train" if where != "meta" else "meta"
    payload = {"data": RunsCode(marker), "fine_labels": [0]}
    if where == "inside an object array":
        payload["data"] = np.array([RunsCode(marker), 0], dtype=object)
    crafted = pickle.dumps(payload, protocol=2)
    pickle.loads(crafted)  # the payload is live: plain pickle.load runs it
    assert marker.exists()
    marker.unlink()

    (root / "cifar-100-python" / file).write_bytes(crafted)
    with pytest.raises(UserError, match=rf"cifar-100-python/{file}: not loaded \(refused to load \w+\.exec,"):
        prepare(tmp_path / "out", "benchmark=cifar100", f"data.root={root}")
    assert not marker.exists()
    assert not (tmp_path / "out" / "data").exists()


def test_cifar100_files_other_than_the_release_are_refused_by_md5(tmp_path):
    root = tmp_path / "datasets"
    write_fake_cifar100_benchmark(root)
    with pytest.raises(UserError, match=r"cifar-100-python/meta: not the original CIFAR-100 file \(md5 differs\)"):
        prepare(tmp_path / "out", "benchmark=cifar100", f"data.root={root}")


def class_colour(index: int, split: str) -> tuple[int, int, int]:
    """A solid colour per class index and split, 25 levels apart: JPEG's error (a level or two) cannot blur two apart."""
    return (index % 10 * 25, index // 10 * 25, 60 if split == "train" else 190)


def test_imagenet100_prepare_on_a_tiny_fake_release(tmp_path):
    from ncis.datasets.imagenet100 import CLASSES

    # torchvision's ImageFolder, which the paper's code reads ImageNet-100 with, numbers the
    # class folders in sorted order: class i is the i-th wnid in sorted order.
    wnids = sorted(CLASSES)
    assert list(CLASSES) == wnids and len(set(wnids)) == 100
    assert get_benchmark("imagenet100").class_names == tuple(CLASSES[w] for w in wnids)
    root = tmp_path / "datasets"
    for split in ["train", "val"]:
        for index, wnid in enumerate(wnids):
            (root / "imagenet" / split / wnid).mkdir(parents=True)
            Image.new("RGB", (30, 20), class_colour(index, split)).save(root / "imagenet" / split / wnid / f"{wnid}_1.JPEG", quality=95)
    (root / "imagenet" / "train" / "n99999999").mkdir()  # an ImageNet-1k class outside the subset
    Image.new("RGB", (30, 20), (255, 255, 255)).save(root / "imagenet" / "train" / "n99999999" / "x.JPEG")

    with pytest.raises(UserError, match="iNaturalist"):
        prepare(tmp_path / "out", "benchmark=imagenet100", f"data.root={root}")
    write_ood_folders(root, ["iNaturalist", "SUN", "Places", "dtd/images"])
    _, layout = prepare(tmp_path / "out", "benchmark=imagenet100", f"data.root={root}")
    for split, folder in [("train", layout.id_train), ("val", layout.id_test)]:
        images, labels = load_images(folder)
        assert images.shape == (100, 224, 224, 3) and labels.tolist() == list(range(100))  # none from n99999999
        expected = np.array([class_colour(index, split) for index in labels], float)
        assert np.abs(images.reshape(100, -1, 3).mean(1) - expected).max() < 3, split
    assert all(len(image_folder(layout.ood(name))) == 2 for name in ["inaturalist", "sun", "places", "textures"])


# --- the paper's per-class words (token inverted, synthesis prompt) -------------------------


def stems(word: str) -> set[str]:
    """The word and its singulars: the paper's names are CIFAR's labels, often in the plural."""
    return {word, word[:-1] if word.endswith("s") else word, word[:-3] + "y" if word.endswith("ies") else word}


def names_a_word_of(name: str, label: str) -> bool:
    """Some word of `name` (or its singular) starts some word of `label`: 'chimp' ~ 'chimpanzee'."""
    return any(label_word.startswith(stem) for word in prompt_words(name) for stem in stems(word) for label_word in prompt_words(label))


def first_word_differs(benchmark) -> dict[str, str]:
    """display name -> token name, for the classes whose inverted word is not the display name's first."""
    return {
        display: token
        for display, token in zip(benchmark.class_names, benchmark.token_names)
        if prompt_words(display)[0] != prompt_words(token)[0]
    }


def test_cifar100_paper_names_follow_the_label_order():
    from ncis.datasets.cifar100 import CIFAR100_LABELS

    benchmark = get_benchmark("cifar100")
    assert len(benchmark.token_names) == len(benchmark.prompt_names) == len(CIFAR100_LABELS) == 100
    for label, token, prompt in zip(CIFAR100_LABELS, benchmark.token_names, benchmark.prompt_names):
        assert len(prompt_words(token)) == 1, token  # one word: its first token is the one inverted
        assert names_a_word_of(token, label) and names_a_word_of(prompt, label), (label, token, prompt)
    # Exactly where the paper inverts another word than the label's first (embed_c100_images_clip.py:33-134).
    assert first_word_differs(benchmark) == {
        "apple": "apples", "aquarium fish": "fish", "bottle": "bottles", "bowl": "bowls", "can": "cans",
        "chimpanzee": "chimp", "cup": "cups", "lawn mower": "mower", "mushroom": "mushrooms", "orange": "oranges",
        "orchid": "orchids", "pear": "pears", "pickup truck": "truck", "plate": "plates", "poppy": "poppies",
        "rose": "roses", "sunflower": "sunflowers", "sweet pepper": "peppers", "tulip": "tulips",
    }  # fmt: skip
    prompts = dict(zip(benchmark.token_names, benchmark.prompt_names))
    assert prompts["fish"] == "aquarium fish" and prompts["mower"] == "lawn-mower" and prompts["peppers"] == "sweet peppers"
    assert prompts["chimp"] == "chimp"  # not the reference's "chimpanzee", which lacks the token "chimp"


def test_imagenet100_paper_names_follow_the_wnid_order():
    from ncis.datasets.imagenet100 import CLASSES

    benchmark = get_benchmark("imagenet100")
    assert len(benchmark.token_names) == len(benchmark.prompt_names) == len(CLASSES) == 100
    assert all(len(prompt_words(token)) == 1 for token in benchmark.token_names)
    tokens = dict(zip(CLASSES, benchmark.token_names))
    assert tokens["n01498041"] == "stingray" and tokens["n02071294"] == "orca" and tokens["n02510455"] == "panda"
    assert tokens["n02687172"] == "carrier" and tokens["n03032252"] == "cinema" and tokens["n07745940"] == "strawberry"
    assert first_word_differs(benchmark) == {
        "crayfish": "crawfish", "killer whale": "orca", "giant panda": "panda", "aircraft carrier": "carrier",
        "lighthouse": "beacon", "ring binder": "binder", "storage chest": "chest", "movie theater": "cinema",
        "jeans": "jean", "lawn mower": "mower", "metal nail": "nail", "shipwreck": "wreck",
    }  # fmt: skip
    # The prompt is the token name itself except for the paper's suffixes (dream_ood.py:503-514).
    suffixed = {token: prompt for token, prompt in zip(benchmark.token_names, benchmark.prompt_names) if token != prompt}
    assert suffixed == {
        "stingray": "stingray in the water", "kite": "kite bird", "tick": "tick bite", "quail": "quail bird",
        "ox": "ox animal", "impala": "impala animal", "chest": "chest box", "nail": "wire nail",
    }  # fmt: skip


def test_benchmark_names_default_to_class_names_and_are_checked():
    from ncis.datasets import Benchmark

    digits_benchmark = get_benchmark("digits")
    assert digits_benchmark.token_names == digits_benchmark.prompt_names == digits_benchmark.class_names
    assert not digits_benchmark.keeps_originals and get_benchmark("imagenet100").keeps_originals

    def make(**names):
        return Benchmark("fake", ("cat", "chimpanzee"), 8, 3, {}, prepare_data=None, **names)

    assert make(token_names=("cat", "chimp"), prompt_names=("cat", "chimp")).token_names == ("cat", "chimp")
    with pytest.raises(ValueError, match="1 token_names for 2 classes"):
        make(token_names=("cat",))
    # The reference's own slip: the word swapped in synthesis must occur in its prompt.
    with pytest.raises(ValueError, match="class 1: token name 'chimp' is not a word of prompt name 'chimpanzee'"):
        make(token_names=("cat", "chimp"))


# --- ImageNet-100: the original training files beside the 224 crops ------------------------


def write_fake_imagenet(root: Path, train_per_class: int = 2) -> dict[tuple[int, int], Path]:
    """Solid-colour JPEGs larger than 224 (colour = (class, n)) under root/imagenet; returns (class, n) -> source."""
    from ncis.datasets.imagenet100 import CLASSES

    sizes = [(300, 260), (260, 400), (420, 300)]
    sources = {}
    for split, count in [("train", train_per_class), ("val", 1)]:
        for index, wnid in enumerate(CLASSES):
            folder = root / "imagenet" / split / wnid
            folder.mkdir(parents=True)
            for n in range(count):
                path = folder / f"{wnid}_{n}.JPEG"
                Image.new("RGB", sizes[n % len(sizes)], (2 * index, 100 * n, 50)).save(path, quality=95)
                if split == "train":
                    sources[index, n] = path
    write_ood_folders(root, ["iNaturalist", "SUN", "Places", "dtd/images"])
    return sources


def test_imagenet100_prepare_keeps_the_original_jpegs_image_for_image(tmp_path):
    sources = write_fake_imagenet(tmp_path / "datasets")
    _, layout = prepare(tmp_path / "out", "benchmark=imagenet100", f"data.root={tmp_path / 'datasets'}")

    crops, originals = image_folder(layout.id_train), image_folder(layout.id_train_originals)
    assert originals.targets == crops.targets == sorted(crops.targets) and len(originals) == 200
    for (crop_path, label), (original_path, original_label) in zip(crops.samples, originals.samples):
        n = int(Path(crop_path).stem)
        assert (label, n) == (original_label, int(Path(original_path).stem))
        source = sources[label, n]
        assert Path(original_path).read_bytes() == source.read_bytes()  # the file itself, not a re-encoding
        assert os.path.samefile(original_path, source)  # same file system here: a hard link, no extra disk
        with Image.open(crop_path) as crop, Image.open(original_path) as original:
            assert crop.size == (224, 224) and original.size == Image.open(source).size  # e.g. 300x260, not 224
            assert np.abs(np.asarray(crop, float).mean((0, 1)) - np.asarray(original.convert("RGB"), float).mean((0, 1))).max() < 3

    # What embed does with them: the paper's Resize(512) + CenterCrop(512) of the original.
    from torchvision import transforms

    view = transforms.Compose([transforms.Resize(512), transforms.CenterCrop(512), transforms.ToTensor()])
    assert image_folder(layout.id_train_originals, transform=view)[0][0].shape == (3, 512, 512)


def test_imagenet100_originals_are_copied_across_file_systems(tmp_path, monkeypatch):
    import errno

    sources = write_fake_imagenet(tmp_path / "datasets", train_per_class=1)

    def cross_device(source, target):
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", cross_device)
    _, layout = prepare(tmp_path / "out", "benchmark=imagenet100", f"data.root={tmp_path / 'datasets'}")
    for path, label in image_folder(layout.id_train_originals).samples:
        assert not os.path.samefile(path, sources[label, 0])
        assert Path(path).read_bytes() == sources[label, 0].read_bytes()


def test_fitting_a_32px_image_to_32px_is_the_identity():
    """LSUN-C and iSUN are released as 32x32 images, which the paper feeds as stored: prepare must not
    touch their pixels (docs/paper-fidelity.md, evaluate)."""
    from PIL import Image

    from ncis.datasets.files import fit_square

    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(np.asarray(fit_square(Image.fromarray(pixels), 32, 32)), pixels)
