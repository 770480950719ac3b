"""The embedded default benchmark: scikit-learn's bundled 8x8 digits, OOD sets from bundled assets.

Nothing is downloaded. The OOD sets imitate how the digits themselves were made (UCI
optdigits: a 32x32 binary bitmap, height-normalised, counted in 4x4 blocks, so every
pixel is one of 17 levels 0..16), so that a detector cannot tell them apart by file
format quirks alone:

- `letters` (near): letter glyphs from DejaVu Sans (shipped with matplotlib), with random
  affine jitter and stroke thickness, drawn at 32x32 and block-counted like the digits.
- `photos` (far): patches of scikit-learn's two bundled sample photographs.
- `textures` (far): procedural gratings, checkerboards and blobs.
- `noise` (far): pixel noise, some of it blurred.
"""

from __future__ import annotations

import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFont
from scipy.ndimage import gaussian_filter

from ncis.datasets import Benchmark, register, write_image_folder
from ncis.io import atomic_path
from ncis.layout import Layout

BITMAP = 32  # the optdigits bitmap size; images are 8x8 counts of its 4x4 blocks
LEVELS = 16  # a 4x4 block holds 0..16 set pixels
MAX_WIDTH = 24  # widest glyph in bitmap pixels: most digits span 6 of the 8 columns

# Glyphs a digit could pass for once drawn 8x8 (O/o/Q/D~0, I/l/i/j/J~1, Z/z~2, S/s~5,
# b/G~6, T~7, B~8, g/q~9) are left out: the set is meant to be near-OOD, not
# mislabelled ID, and a detector should not be punished for accepting a "0" drawn as "O".
LETTERS = "".join(c for c in "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz" if c not in "OoQDIilJjZzSsBbGgqT")
FONT_FILES = ("DejaVuSans.ttf", "DejaVuSans-Bold.ttf")


def prepare_data(params, layout: Layout) -> None:
    """Write ID train/test and every OOD set as ImageFolders under `layout.data`, all or nothing."""
    with atomic_path(layout.data) as staging_data:
        # A Layout rooted at the staging folder's parent puts `data` exactly at `staging_data`,
        # so every path below is the final one, just under a temporary name until the rename.
        staging = Layout(staging_data.parent)
        (train_x, train_y), (test_x, test_y) = split_digits(params.data.test_fraction, params.seed)
        write_image_folder(staging.id_train, train_x, train_y)
        write_image_folder(staging.id_test, test_x, test_y)
        for name in DIGITS.ood_sets:
            images = OOD_GENERATORS[name](_rng(params.seed, name), params.data.ood_size)
            write_image_folder(staging.ood(name), images, np.zeros(len(images), np.int64))


def split_digits(test_fraction: float, seed: int):
    """(train images, labels), (test images, labels); uint8 [N, 8, 8, 1], stratified by class."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    images = _levels_to_uint8(digits.images)[..., None]
    train_x, test_x, train_y, test_y = train_test_split(
        images, digits.target.astype(np.int64), test_size=test_fraction, stratify=digits.target, random_state=seed
    )
    return (train_x, train_y), (test_x, test_y)


# --- OOD generators: (rng, count) -> uint8 [count, 8, 8, 1] ---------------------------


def make_letters(rng: np.random.Generator, count: int) -> np.ndarray:
    fonts = [ImageFont.truetype(str(_font_path(name)), 96) for name in FONT_FILES]
    images = []
    for _ in range(count):
        glyph = _render_glyph(
            LETTERS[rng.integers(len(LETTERS))],
            fonts[rng.integers(len(fonts))],
            stroke=int(rng.integers(0, 3)),
            angle=rng.uniform(-15, 15),
            shear=rng.uniform(-0.25, 0.25),
        )
        bitmap = _fit_bitmap(glyph, height=rng.uniform(0.94, 1.0), shift=int(rng.integers(-2, 3)))
        images.append(_block_count(bitmap))
    return _levels_to_uint8(np.stack(images))[..., None]


def make_photos(rng: np.random.Generator, count: int) -> np.ndarray:
    from sklearn.datasets import load_sample_images

    photos = [Image.fromarray(photo).convert("L") for photo in load_sample_images().images]
    images = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(24, 160))
        left, top = int(rng.integers(photo.width - side)), int(rng.integers(photo.height - side))
        patch = photo.crop((left, top, left + side, top + side)).resize((8, 8), Image.BOX)
        images.append(_stretch(np.asarray(patch, np.float64)))
    return _quantize(np.stack(images))


def make_textures(rng: np.random.Generator, count: int) -> np.ndarray:
    y, x = np.mgrid[0:BITMAP, 0:BITMAP].astype(np.float64)
    images = []
    for _ in range(count):
        kind = rng.integers(3)
        theta = rng.uniform(0, np.pi)
        along = x * np.cos(theta) + y * np.sin(theta)
        across = -x * np.sin(theta) + y * np.cos(theta)
        if kind == 0:  # grating, sine or square wave, period 5..16 bitmap pixels
            wave = np.sin(2 * np.pi * along / rng.uniform(5, 16) + rng.uniform(0, 2 * np.pi))
            texture = (wave > 0).astype(np.float64) if rng.random() < 0.5 else (wave + 1) / 2
        elif kind == 1:  # (rotated) checkerboard
            cell = rng.uniform(3, 10)
            texture = ((np.floor(along / cell) + np.floor(across / cell)) % 2).astype(np.float64)
        else:  # a few Gaussian blobs
            texture = np.zeros_like(x)
            for _ in range(rng.integers(2, 7)):
                cx, cy, sigma = rng.uniform(0, BITMAP), rng.uniform(0, BITMAP), rng.uniform(2, 7)
                texture += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
        images.append(_stretch(_block_mean(texture)))
    return _quantize(np.stack(images))


def make_noise(rng: np.random.Generator, count: int) -> np.ndarray:
    images = []
    for _ in range(count):
        if rng.random() < 0.5:
            noise = rng.uniform(0, 1, (8, 8))
        else:
            noise = np.clip(rng.normal(0.5, 0.25, (8, 8)), 0, 1)
        if rng.random() < 0.5:
            noise = _stretch(gaussian_filter(noise, rng.uniform(0.5, 1.0)))
        images.append(noise)
    return _quantize(np.stack(images))


OOD_GENERATORS = {"letters": make_letters, "photos": make_photos, "textures": make_textures, "noise": make_noise}


# --- helpers --------------------------------------------------------------------------


def _rng(seed: int, name: str) -> np.random.Generator:
    # crc32, not hash(): Python salts string hashes per process, which would break determinism.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _font_path(name: str) -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name


def _render_glyph(letter: str, font, stroke: int, angle: float, shear: float) -> np.ndarray:
    """A large binary bitmap of the letter, sheared and rotated."""
    canvas = Image.new("L", (192, 192), 0)
    ImageDraw.Draw(canvas).text((96, 96), letter, fill=255, font=font, anchor="mm", stroke_width=stroke, stroke_fill=255)
    # One affine map about the centre: rotation then horizontal shear (PIL wants the inverse).
    cos, sin = np.cos(np.radians(angle)), np.sin(np.radians(angle))
    forward = np.array([[cos, -sin + shear * cos], [sin, cos + shear * sin]])
    inverse = np.linalg.inv(forward)
    offset = np.array([96, 96]) - inverse @ np.array([96, 96])
    coefficients = (*inverse[0], offset[0], *inverse[1], offset[1])
    canvas = canvas.transform(canvas.size, Image.AFFINE, coefficients, resample=Image.BILINEAR)
    return np.asarray(canvas) > 127


def _fit_bitmap(glyph: np.ndarray, height: float, shift: int) -> np.ndarray:
    """Place the glyph in the 32x32 bitmap the way optdigits placed digits.

    The digits fill the bitmap's height and are at most ~7 of 8 blocks wide, centred; a
    glyph placed otherwise would be told apart by its position, not its shape.
    """
    rows, cols = np.nonzero(glyph)
    box = Image.fromarray(glyph[rows.min() : rows.max() + 1, cols.min() : cols.max() + 1].astype(np.uint8) * 255)
    tall = max(1, round(height * BITMAP))
    width = max(1, min(round(box.width * tall / box.height), MAX_WIDTH))  # wide glyphs are narrowed
    small = np.asarray(box.resize((width, tall), Image.BILINEAR)) > 127
    bitmap = np.zeros((BITMAP, BITMAP), bool)
    top = (BITMAP - tall) // 2
    left = int(np.clip((BITMAP - width) // 2 + shift, 0, BITMAP - width))
    bitmap[top : top + tall, left : left + width] = small
    return bitmap


def _block_count(bitmap: np.ndarray) -> np.ndarray:
    """32x32 binary -> 8x8 counts 0..16, exactly how the optdigits images were made."""
    return bitmap.reshape(8, 4, 8, 4).sum(axis=(1, 3))


def _block_mean(image: np.ndarray) -> np.ndarray:
    return image.reshape(8, 4, 8, 4).mean(axis=(1, 3))


def _stretch(image: np.ndarray) -> np.ndarray:
    # Full 0..1 contrast, so a far-OOD set is not told apart by brightness alone.
    low, high = image.min(), image.max()
    return (image - low) / (high - low) if high > low else np.zeros_like(image)


def _quantize(images: np.ndarray) -> np.ndarray:
    """[N, 8, 8] in 0..1 -> uint8 [N, 8, 8, 1] on the digits' 17 levels."""
    return _levels_to_uint8(np.round(images * LEVELS))[..., None]


def _levels_to_uint8(levels: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(levels, np.float64) * 255 / LEVELS).astype(np.uint8)


DIGITS = register(
    Benchmark(
        name="digits",
        class_names=("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
        image_size=8,
        channels=1,
        ood_sets={"letters": "near", "photos": "far", "textures": "far", "noise": "far"},
        prepare_data=prepare_data,
        default_diffusion="tiny",
        needs=(
            "data.test_fraction",
            "data.ood_size",
            *(f"diffusion.{key}" for key in
              ("train_steps", "train_batch_size", "train_lr", "cfg_dropout", "token_noise", "unet_channels", "text_width")),
        ),
    )
)
