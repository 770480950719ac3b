"""Benchmark registry and the one image loader every stage uses.

Every benchmark materialises its data (in `prepare`) as ImageFolders laid out as
`<split>/<class index>/<n>.png` (OOD sets use class 0), so the later stages read
digits, CIFAR100, ImageNet100 and synthetic outliers through the same code.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

import numpy as np
from PIL import Image

from ncis.errors import UserError
from ncis.io import read_image

if TYPE_CHECKING:
    from ncis.datasets.folders import NumericImageFolder


@dataclass(frozen=True)
class Benchmark:
    name: str
    class_names: tuple[str, ...]
    image_size: int
    channels: int
    ood_sets: dict[str, str]  # name -> group ("near" | "far" | "stats": differs only in global pixel statistics)
    prepare_data: Callable  # (params, layout) -> None
    # Where the diffusion model comes from when `diffusion.model` is empty:
    # "tiny" = the model `prepare` trains, else a hub id / path.
    default_diffusion: str = "CompVis/stable-diffusion-v1-4"
    # Parameters only some benchmarks use (None elsewhere), that this one cannot run without.
    needs: tuple[str, ...] = ("data.root",)
    # The paper's words per class (empty = class_names). The token NCIS inverts and later swaps
    # for an outlier embedding is the FIRST token of token_names[c]: `embed` writes the class as
    # token_names[c] ("An image of a fish"); `synthesize` writes prompt_names[c] ("A high-quality
    # image of the aquarium fish") and swaps that same token where it occurs in the prompt.
    token_names: tuple[str, ...] = ()
    prompt_names: tuple[str, ...] = ()
    # True: `prepare` also keeps the original training files, image for image beside
    # `Layout.id_train`, at `Layout.id_train_originals` (ImageNet-100: the paper embeds the
    # original JPEGs at 512, not the stored 224 crops).
    keeps_originals: bool = False
    # OOD sets for choosing settings (name -> group), written by `prepare` under `Layout.ood_val`
    # from sources disjoint from the test sets', and reported by `evaluate` apart from them.
    # Empty: the benchmark has none (the paper's benchmarks).
    validation_ood_sets: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        for name in ("token_names", "prompt_names"):
            names = tuple(getattr(self, name) or self.class_names)
            if len(names) != len(self.class_names):
                raise ValueError(f"{self.name}: {len(names)} {name} for {len(self.class_names)} classes")
            object.__setattr__(self, name, names)
        for c, (token, prompt) in enumerate(zip(self.token_names, self.prompt_names)):
            # Word-level stand-in for the tokenizer check `synthesize` makes: a token name missing
            # from its prompt name would leave the outlier embedding unused (see docs/paper-fidelity.md).
            first_word = prompt_words(token)[:1]
            if not first_word or first_word[0] not in prompt_words(prompt):
                raise ValueError(f"{self.name}: class {c}: token name {token!r} is not a word of prompt name {prompt!r}")

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def original_train_images(self, layout) -> Path:
        """The training images as the benchmark's sources hold them, which `embed` inverts:
        `Layout.id_train_originals` where the benchmark keeps them, else `Layout.id_train`."""
        return layout.id_train_originals if self.keeps_originals else layout.id_train

    def classifier_train_images(self, layout, augment: str) -> Path:
        """The ID images the classifier trains on: random resized crops (`resized_crop`) come from the
        original files where the benchmark keeps them (ImageNet-100, as train_ood_det_in100.py:124-131
        crops the originals), every other augmentation from `Layout.id_train`."""
        return self.original_train_images(layout) if augment == "resized_crop" else layout.id_train


def prompt_words(text: str) -> list[str]:
    """Lower-cased runs of letters and digits: the words a CLIP-style tokenizer splits a prompt into."""
    return re.findall(r"[^\W_]+", text.lower())


BENCHMARKS: dict[str, Benchmark] = {}


def register(benchmark: Benchmark) -> Benchmark:
    BENCHMARKS[benchmark.name] = benchmark
    return benchmark


def get_benchmark(name: str) -> Benchmark:
    _load_registry()
    if name not in BENCHMARKS:
        raise UserError(f"unknown benchmark {name!r}; choose one of {sorted(BENCHMARKS)}")
    return BENCHMARKS[name]


def _load_registry() -> None:
    # Importing the entries registers them; kept lazy so config validation stays cheap.
    from ncis.datasets import cifar100, digits, imagenet100  # noqa: F401


def image_folder(folder: str | Path, transform=None) -> NumericImageFolder:
    from ncis.datasets.folders import NumericImageFolder  # torchvision: only for the stages that read images

    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is missing; run `ncis prepare` (or the stage that writes it) first")
    try:
        return NumericImageFolder(str(folder), transform=transform)
    except FileNotFoundError as err:  # torchvision: no class folder, or a class folder without images
        raise UserError(f"{folder}: {err}; lay images out as <class index>/<n>.png (`ncis prepare` writes them so)") from None


def load_images(
    folder: str | Path, channels: int | None = None, size: int | None = None, limit: int | None = None, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Eagerly load a (small) ImageFolder: uint8 images [N, H, W, C] and int64 labels [N].

    `limit`: at most that many images, a random subset (seeded) kept in file order.
    """
    dataset = image_folder(folder)
    picked = np.arange(len(dataset))
    if limit is not None:
        picked = np.sort(np.random.default_rng(seed).choice(len(dataset), size=min(limit, len(dataset)), replace=False))
    mode = {1: "L", 3: "RGB"}.get(channels or 0)
    images = []
    for path in (dataset.samples[i][0] for i in picked):
        image = read_image(path, mode)
        if size and image.size != (size, size):
            image = image.resize((size, size), Image.BILINEAR)
        array = np.asarray(image, dtype=np.uint8)
        images.append(array[..., None] if array.ndim == 2 else array)
    labels = np.asarray(dataset.targets, dtype=np.int64)[picked]
    return np.stack(images) if images else np.zeros((0, size or 0, size or 0, channels or 1), np.uint8), labels


def write_image_folder(folder: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Write uint8 [N, H, W, C] images as `<label>/<n>.png` (n counts within the class)."""
    counts: dict[int, int] = {}
    for image, label in zip(images, labels):
        label = int(label)
        n = counts.get(label, 0)
        counts[label] = n + 1
        (folder / str(label)).mkdir(parents=True, exist_ok=True)
        Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(folder / str(label) / f"{n}.png")
