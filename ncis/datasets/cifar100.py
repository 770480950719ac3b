"""CIFAR-100 (ID) with the OOD sets of the Dream-OOD / NCIS CIFAR-100 benchmark.

Nothing is downloaded: place the data under `data.root` (default in configs/cifar100.yaml:
`datasets/`) as

    <root>/cifar-100-python/           CIFAR-100, python version (torchvision's format)
    <root>/svhn/test_32x32.mat         SVHN test split (torchvision's format)
    <root>/places365/                  Places365 images (any sub-folders)
    <root>/LSUN/                       LSUN-C (the ODIN "LSUN crop" release)
    <root>/iSUN/                       iSUN
    <root>/dtd/images/                 Describable Textures (DTD)

`prepare` writes them as 32x32 PNG ImageFolders at the usual Layout paths. Folder OOD
images are resized (shorter side 32) and centre-cropped, as Dream-OOD's evaluation does.

All OOD sets are "far": none shares CIFAR-100's object classes (digits, scenes, textures),
which is how OpenOOD groups them too; its near-OOD sets for CIFAR-100 (CIFAR-10,
TinyImageNet) are not part of this benchmark.
"""

from __future__ import annotations

import io
import pickle
from pathlib import Path

import numpy as np

from ncis.datasets import Benchmark, register, write_image_folder
from ncis.datasets.files import data_root, image_files, require, write_resized_folder
from ncis.errors import UserError
from ncis.io import atomic_path
from ncis.layout import Layout

# CIFAR-100's fine label names in label order (its `meta` file), hard-coded because
# prompts need them before the data exists; `prepare` checks them against the data.
CIFAR100_LABELS = (
    "apple aquarium_fish baby bear beaver bed bee beetle bicycle bottle bowl boy bridge bus butterfly camel can "
    "castle caterpillar cattle chair chimpanzee clock cloud cockroach couch crab crocodile cup dinosaur dolphin "
    "elephant flatfish forest fox girl hamster house kangaroo keyboard lamp lawn_mower leopard lion lizard lobster "
    "man maple_tree motorcycle mountain mouse mushroom oak_tree orange orchid otter palm_tree pear pickup_truck "
    "pine_tree plain plate poppy porcupine possum rabbit raccoon ray road rocket rose sea seal shark shrew skunk "
    "skyscraper snail snake spider squirrel streetcar sunflower sweet_pepper table tank telephone television tiger "
    "tractor train trout tulip turtle wardrobe whale willow_tree wolf woman worm"
).split()

# The paper's single words per class (NCIS, LarsDoorenbos/NCIS@42fb174,
# scripts/get_embeddings/embed_c100_images_clip.py:33-134, the same list as
# ldm/modules/encoders/modules.py:160-261): the first token of each is the token inverted by
# `embed` ("An image of a fish") and swapped for an outlier embedding by `synthesize`.
TOKEN_NAMES = (
    "apples", "fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottles",
    "bowls", "boy", "bridge", "bus", "butterfly", "camel", "cans", "castle", "caterpillar", "cattle",
    "chair", "chimp", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cups", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "keyboard",
    "lamp", "mower", "leopard", "lion", "lizard", "lobster", "man", "maple", "motorcycle", "mountain",
    "mouse", "mushrooms", "oak", "oranges", "orchids", "otter", "palm", "pears", "truck", "pine",
    "plain", "plates", "poppies", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "roses", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflowers", "peppers", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulips", "turtle", "wardrobe", "whale", "willow", "wolf", "woman", "worm",
)  # fmt: skip

# The paper's names in the synthesis prompt "A high-quality image of the <name>"
# (LarsDoorenbos/NCIS@42fb174, scripts/dream_ood.py:84-184), with one departure: class 21 is
# "chimp", not the reference's "chimpanzee", which CLIP tokenizes as chim|pan|zee so that the
# swapped token "chimp" never occurs and the class's outlier embedding goes unused.
PROMPT_NAMES = (
    "apples", "aquarium fish", "baby", "bear", "beaver", "bed", "bee", "beetle", "bicycle", "bottles",
    "bowls", "boy", "bridge", "bus", "butterfly", "camel", "cans", "castle", "caterpillar", "cattle",
    "chair", "chimp", "clock", "cloud", "cockroach", "couch", "crab", "crocodile", "cups", "dinosaur",
    "dolphin", "elephant", "flatfish", "forest", "fox", "girl", "hamster", "house", "kangaroo", "computer keyboard",
    "lamp", "lawn-mower", "leopard", "lion", "lizard", "lobster", "man", "maple", "motorcycle", "mountain",
    "mouse", "mushrooms", "oak", "oranges", "orchids", "otter", "palm", "pears", "pickup truck", "pine",
    "plain", "plates", "poppies", "porcupine", "possum", "rabbit", "raccoon", "ray", "road", "rocket",
    "roses", "sea", "seal", "shark", "shrew", "skunk", "skyscraper", "snail", "snake", "spider",
    "squirrel", "streetcar", "sunflowers", "sweet peppers", "table", "tank", "telephone", "television", "tiger", "tractor",
    "train", "trout", "tulips", "turtle", "wardrobe", "whale", "willow", "wolf", "woman", "worm",
)  # fmt: skip

IMAGE_SIZE = 32
# name -> folder under root (svhn is read by torchvision instead)
OOD_FOLDERS = {"places365": "places365", "lsun": "LSUN", "isun": "iSUN", "textures": "dtd/images"}


def prepare_data(params, layout: Layout) -> None:
    root = data_root(params)
    require(root / "cifar-100-python", f"place CIFAR-100 (python version) under {root}/cifar-100-python or set data.root")
    require(root / "svhn" / "test_32x32.mat", f"place SVHN's test_32x32.mat under {root}/svhn or set data.root")
    folders = {name: require(root / sub, f"place the {name} OOD images under {root / sub} or set data.root") for name, sub in OOD_FOLDERS.items()}

    from torchvision.datasets import SVHN

    with atomic_path(layout.data) as staging_data:
        staging = Layout(staging_data.parent)  # its `data` is the staging folder (see digits.py)
        for split, folder in (("train", staging.id_train), ("test", staging.id_test)):
            write_image_folder(folder, *read_cifar100(root / "cifar-100-python", split))
        svhn = _torchvision(SVHN, str(root / "svhn"), split="test", download=False)
        images = svhn.data.transpose(0, 2, 3, 1)  # torchvision keeps SVHN as [N, C, H, W]
        write_image_folder(staging.ood("svhn"), images, np.zeros(len(images), np.int64))
        for name, source in folders.items():
            write_resized_folder(image_files(source), staging.ood(name) / "0", IMAGE_SIZE, IMAGE_SIZE)


def read_cifar100(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """One split of CIFAR-100's python version: uint8 images [N, 32, 32, 3] and fine labels [N].

    The release is a set of Python pickles, so ncis reads it itself rather than through
    torchvision (whose CIFAR100 calls plain `pickle.load`): checked against the release's md5
    sums (torchvision's), then unpickled by `_CifarUnpickler`, which runs no code the file names.
    """
    from torchvision.datasets import CIFAR100

    md5s = dict(CIFAR100.train_list + CIFAR100.test_list)
    meta = _load_cifar_file(folder / CIFAR100.meta["filename"], CIFAR100.meta["md5"])
    if tuple(meta.get(CIFAR100.meta["key"], ())) != tuple(CIFAR100_LABELS):
        raise UserError(f"{folder}: unexpected class names; is this CIFAR-100's python version?")
    entry = _load_cifar_file(folder / split, md5s[split])
    data, labels = entry.get("data"), np.asarray(entry.get("fine_labels", []))
    if not (isinstance(data, np.ndarray) and data.dtype == np.uint8 and data.shape[1:] == (3 * IMAGE_SIZE**2,) and labels.shape == data.shape[:1]):
        raise UserError(f"{folder / split}: not a CIFAR-100 split (uint8 data [N, 3072] and N fine_labels); replace it with the original release")
    # Each row holds the red, green and blue planes in turn, each 32 rows of 32 pixels.
    return data.reshape(-1, 3, IMAGE_SIZE, IMAGE_SIZE).transpose(0, 2, 3, 1), labels.astype(np.int64)


def _load_cifar_file(path: Path, md5: str) -> dict:
    from torchvision.datasets import utils

    require(path, "place CIFAR-100's python version (meta, train, test) there or set data.root")
    if not utils.check_integrity(str(path), md5):
        raise UserError(f"{path}: not the original CIFAR-100 file (md5 differs); replace it with the original release")
    try:
        # latin1: the release was pickled by Python 2, whose byte strings hold the pixel data.
        entry = _CifarUnpickler(io.BytesIO(path.read_bytes()), encoding="latin1").load()
    except (pickle.UnpicklingError, EOFError, ValueError, TypeError) as err:
        raise UserError(f"{path}: not loaded ({err}); replace it with the original release") from None
    if not isinstance(entry, dict):
        raise UserError(f"{path}: not a CIFAR-100 file (no dict inside); replace it with the original release")
    return entry


def _numpy_reconstruct():
    try:
        from numpy._core.multiarray import _reconstruct  # numpy >= 2
    except ImportError:  # numpy 1.x
        from numpy.core.multiarray import _reconstruct
    return _reconstruct


def _latin1_bytes(text: str, encoding: str) -> bytes:
    """`_codecs.encode` as Python 3 pickles bytes at protocol 2 (`encode(text, "latin1")`), and nothing else."""
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"refused to load _codecs.encode with encoding {encoding!r}")
    return text.encode("latin1")


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles plain containers and numpy arrays only: the one thing a CIFAR file references
    besides builtin values is numpy's array reconstruction (the globals `torch.load(weights_only=True)`
    allows for arrays too; plus bytes as a Python 3 re-pickling at protocol 2 writes them). Any
    other global, e.g. a callable a crafted file would run, is refused."""

    ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"): _numpy_reconstruct(),  # the name numpy 1 pickled
        ("numpy._core.multiarray", "_reconstruct"): _numpy_reconstruct(),
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_bytes,
    }

    def find_class(self, module: str, name: str):
        try:
            return self.ALLOWED[module, name]
        except KeyError:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}, which no CIFAR-100 file holds") from None


def _torchvision(dataset_class, root: str, **kwargs):
    try:
        return dataset_class(root, **kwargs)
    except RuntimeError as err:  # torchvision's "Dataset not found or corrupted" (missing file, md5 mismatch)
        raise UserError(f"{root}: {err}; replace the files with the original release") from None


CIFAR100 = register(
    Benchmark(
        name="cifar100",
        class_names=tuple(label.replace("_", " ") for label in CIFAR100_LABELS),
        image_size=IMAGE_SIZE,
        channels=3,
        ood_sets={"svhn": "far", "places365": "far", "lsun": "far", "isun": "far", "textures": "far"},
        needs=("data.root",),
        prepare_data=prepare_data,
        token_names=TOKEN_NAMES,
        prompt_names=PROMPT_NAMES,
    )
)
