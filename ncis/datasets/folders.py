"""The ImageFolder every stage reads images through (apart, so that importing the benchmark
registry does not import torchvision: stages that read no images start a second sooner)."""

from __future__ import annotations

from pathlib import Path

from torchvision.datasets import ImageFolder

from ncis.errors import UserError
from ncis.io import read_image


class NumericImageFolder(ImageFolder):
    """torchvision's ImageFolder with class folders named by index, sorted as numbers (10 after 9)."""

    def __init__(self, root: str, transform=None):
        super().__init__(root, transform=transform, loader=read_image)  # a broken file: one line naming it
        # torchvision walks folders in text order (10.png before 2.png); the order written is the
        # order read, so "the first N images" and resumable chunks mean the same images everywhere.
        self.samples.sort(key=lambda sample: (sample[1], _numeric_stem(sample[0])))
        self.imgs = self.samples
        self.targets = [label for _, label in self.samples]

    def find_classes(self, directory):
        names = [p.name for p in Path(directory).iterdir() if p.is_dir() and not p.name.startswith(".")]
        if not names:
            raise UserError(f"{directory} holds no class folders; lay images out as <class index>/<n>.png (`ncis prepare` writes them so)")
        try:
            names.sort(key=int)
        except ValueError:
            raise UserError(f"{directory}: class folders must be named by class index (0, 1, ...)") from None
        return names, {name: int(name) for name in names}


def _numeric_stem(path: str) -> tuple:
    stem = Path(path).stem
    return (0, int(stem), "") if stem.isdigit() else (1, 0, stem)
