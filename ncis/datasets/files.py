"""Reading the real benchmarks' image folders (CIFAR100's OOD sets, ImageNet100) from `data.root`."""

from __future__ import annotations

import os
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from PIL import Image

from ncis.errors import UserError

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def data_root(params) -> Path:
    if not params.data.root:
        raise UserError(f"data.root is empty; set it to the folder holding the {params.benchmark} data (--set data.root=PATH)")
    return Path(params.data.root).expanduser()


def require(path: Path, how: str) -> Path:
    if not path.exists():
        raise UserError(f"{path} is missing; {how}")
    return path


def image_files(folder: Path) -> list[Path]:
    """Every image under `folder`, sorted so the written order is reproducible."""
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    if not files:
        raise UserError(f"{folder} holds no images; place the dataset's image files there")
    return files


def write_resized_folder(files: list[Path], folder: Path, resize: int, crop: int) -> None:
    """Write `files` as `folder/<n>.png`: shorter side resized to `resize`, centre-cropped to `crop`."""
    folder.mkdir(parents=True, exist_ok=True)

    def write(job):
        n, source = job
        with Image.open(source) as image:
            fit_square(image.convert("RGB"), resize, crop).save(folder / f"{n}.png")

    # Decoding and encoding release the GIL, so threads use every core without pickling images.
    with ThreadPoolExecutor() as pool:
        list(pool.map(write, enumerate(files)))


def fit_square(image: Image.Image, resize: int, crop: int) -> Image.Image:
    scale = resize / min(image.size)
    width, height = max(crop, round(image.width * scale)), max(crop, round(image.height * scale))
    image = image.resize((width, height), Image.BILINEAR, reducing_gap=3.0)
    left, top = (width - crop) // 2, (height - crop) // 2
    return image.crop((left, top, left + crop, top + crop))


def link_or_copy_files(files: list[Path], folder: Path) -> None:
    """Keep `files` unchanged as `folder/<n><suffix>`: hard links where the file system allows, else copies."""
    folder.mkdir(parents=True, exist_ok=True)

    def keep(job):
        n, source = job
        target = folder / f"{n}{source.suffix.lower()}"
        try:
            os.link(source, target)
        except OSError:  # another file system (EXDEV) or one without hard links
            shutil.copyfile(source, target)

    with ThreadPoolExecutor() as pool:
        list(pool.map(keep, enumerate(files)))
