"""The embedded default benchmark: scikit-learn's bundled 8x8 digits, OOD sets from bundled assets.

Nothing is downloaded. The digits were made by UCI optdigits: a 32x32 binary bitmap,
height-normalised, counted in 4x4 blocks, so every pixel is one of 17 levels 0..16.

Every OOD image is given exactly the pixel values of a random training digit (`match_histogram`:
the image's pixels, ranked by their own value, take that digit's values in order), so no OOD
set can be told apart, nor pushed towards a higher energy, by its brightness, contrast or any
statistic of its pixel values: only by where the ink is. Every set but the turned and flipped
digits (a digit's own pixels, moved) is also blurred or roughened until it has that digit's local
contrast (`local_contrast`: how much neighbouring pixels differ), which a plain CNN's energy
follows as much as it follows shape (docs/digits-study.md). What makes each set is its shapes:

- near: `letters`, letter glyphs from DejaVu Sans (shipped with matplotlib) drawn and
  block-counted like the digits; `rotated`, digits turned by 90 degrees; `flipped`, digits
  upside down or mirrored; `overlaid`, two digits of different classes on top of each other.
  Digits, letters and flips that would still read as a digit are left out.
- far: `photos`, patches of bundled photographs; `textures`, procedural patterns; `noise`,
  pixel noise, some of it blurred.

A third group, `stats`, is the opposite: sets told apart from the digits by nothing but a global
pixel statistic (how bright, how much contrast, which polarity), so that a detector whose
outliers taught it a statistic of the digits is caught (docs/digits-study.md, "Blind spots"). Their
images keep their own pixel values; each one lies outside the training digits' envelope
(`differs_globally`: every digit has a 0 pixel, a brightest pixel of at least 14 and a mean ink
level between the lowest and the highest training digit's):

- stats: `flat`, constant images or gentle ramps; `faint`, digits at 10-50% contrast on a dark
  or grey ground; `bright`, digits washed out on a bright ground; `inverted`, light digits on a
  white ground; `static`, noise of other grains and intensities than the `noise` set's.

Every set exists twice, from disjoint sources: the test sets under `Layout.ood`, which
`evaluate` reports, and the validation sets under `Layout.ood_val`, on which every default is
chosen (docs/digits-study.md). Test sets transform ID *test* digits, use half the letters, the
scikit-learn photographs, three texture kinds, the even levels for flat images and noise grains
of 1 and 4 pixels; validation sets transform *training* digits, use the other letters,
matplotlib's photograph, three other texture kinds, the odd levels and a noise grain of 2 pixels;
every set draws from its own random stream.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from functools import cache
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

# Digit transforms, and the classes each may take. Left out, so that no image is a mislabelled
# digit: what reads as itself after the transform (0, 1, 3, 8 upside down; 0, 1, 8 mirrored; a 0
# lying down), and what comes near a digit by measurement (2 and 5 upside down: more than 1% of
# them are nearer their nearest training digit than the median ID test digit is; every other
# transformed class: none). Measured in docs/digits-study.md, "The OOD sets".
ROTATED_CLASSES = (1, 2, 3, 4, 5, 6, 7, 8, 9)
FLIPS = {"upside_down": (4, 6, 7, 9), "mirrored": (2, 3, 4, 5, 6, 7, 9)}
# Overlaid pairs left out: a 1 is a stroke that most digits contain (its pairs are the ones the
# same measurement finds near a digit, up to 7% for 1 on 8), and 3 with 8 or 9, 4 with 8 (up to 3%).
OVERLAY_EXCLUDED = frozenset({*((1, b) for b in range(2, 10)), (0, 1), (3, 8), (3, 9), (4, 8)})


@dataclass(frozen=True)
class OodSplit:
    """Where one split (test or validation) of the OOD sets draws its shapes from."""

    name: str  # also the prefix of its random streams
    letters: str
    photos: tuple[str, ...]  # keys of PHOTO_FILES
    textures: tuple[str, ...]  # keys of TEXTURES
    digits: str  # "test" | "train": the ID split whose digits the near and stats sets transform
    flat_levels: tuple[int, ...]  # the levels (0..16) of `flat` images
    noise_grains: tuple[int, ...]  # the side in pixels of one `static` noise value


# --- writing the benchmark ----------------------------------------------------------------


def prepare_data(params, layout: Layout) -> None:
    """Write ID train/test, and every OOD set in its test and validation split, all or nothing."""
    with atomic_path(layout.data) as staging_data:
        # A Layout rooted at the staging folder's parent puts `data` exactly at `staging_data`,
        # so every path below is the final one, just under a temporary name until the rename.
        staging = Layout(staging_data.parent)
        (train_x, train_y), (test_x, test_y) = split_digits(params.data.test_fraction, params.seed)
        write_image_folder(staging.id_train, train_x, train_y)
        write_image_folder(staging.id_test, test_x, test_y)
        id_digits = {"train": (_uint8_to_levels(train_x), train_y), "test": (_uint8_to_levels(test_x), test_y)}
        for split, folder, names in ((TEST, staging.ood, DIGITS.ood_sets), (VALIDATION, staging.ood_val, DIGITS.validation_ood_sets)):
            for name in names:
                images = make_ood_set(name, split, params.seed, params.data.ood_size, id_digits)
                write_image_folder(folder(name), images, np.zeros(len(images), np.int64))


def make_ood_set(name: str, split: OodSplit, seed: int, count: int, id_digits: dict) -> np.ndarray:
    """uint8 [count, 8, 8, 1]: the set's shapes, each with the pixel values of a random training digit
    (and, but for the sets in OWN_LOCAL_CONTRAST, its local contrast).

    `id_digits`: {"train": (levels [N, 8, 8], labels), "test": ...}, levels 0..16.
    """
    rng = _rng(seed, f"{split.name}/{name}")
    if name in STATISTICS_GENERATORS:  # their own pixel values: what tells them apart is a global statistic
        envelope = digit_envelope(id_digits["train"][0])
        levels = STATISTICS_GENERATORS[name](rng, count, split, id_digits[split.digits], envelope)
        return _levels_to_uint8(levels)[..., None]
    shapes = OOD_GENERATORS[name](rng, count, split, id_digits[split.digits])
    references = id_digits["train"][0]
    match = match_histogram if name in OWN_LOCAL_CONTRAST else match_local_contrast
    levels = [match(shape, references[rng.integers(len(references))], rng) for shape in shapes]
    return _levels_to_uint8(np.stack(levels))[..., None]


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


def match_histogram(shape: np.ndarray, reference: np.ndarray, rng: np.random.Generator, tiebreak: np.ndarray | None = None) -> np.ndarray:
    """`shape` [8, 8] (any scale, brighter = more ink) given exactly `reference`'s pixel values;
    a stack of shapes [K, 8, 8] gives one image per shape.

    The brightest pixel of `shape` takes the reference's largest value, and so on down. Ties are
    broken by a blurred copy (so a flat region keeps its shape's outline), then by `tiebreak`
    (default: drawn from `rng`).
    """
    shapes = np.asarray(shape, np.float64)
    tiebreak = rng.random(shapes.shape[-2:]) if tiebreak is None else tiebreak
    flat = shapes.reshape(-1, shapes.shape[-2] * shapes.shape[-1])
    blurred = _blur(shapes, 1.0).reshape(flat.shape)
    order = np.lexsort((np.broadcast_to(tiebreak.ravel(), flat.shape), blurred, flat), axis=-1)
    matched = np.empty(flat.shape, reference.dtype)
    np.put_along_axis(matched, order, np.sort(reference.ravel())[None], axis=-1)
    return matched.reshape(shapes.shape)


def local_contrast(images: np.ndarray) -> np.ndarray:
    """Mean absolute difference between horizontally and vertically adjacent pixels, per image [..., H, W]."""
    images = np.asarray(images, np.float64)
    return (np.abs(np.diff(images, axis=-1)).mean((-2, -1)) + np.abs(np.diff(images, axis=-2)).mean((-2, -1))) / 2


def match_local_contrast(shape: np.ndarray, reference: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """`match_histogram`, after blurring (too busy a shape) or roughening (too smooth a shape) it
    by the step of a fixed ladder that brings its local contrast nearest the reference's."""
    tiebreak, roughness = rng.random(shape.shape), rng.standard_normal(shape.shape)
    shape = np.asarray(shape, np.float64)
    shape = (shape - shape.mean()) / (shape.std() or 1.0)
    candidates = np.stack([
        *(_blur(shape, sigma) for sigma in BLUR_LADDER),
        shape,
        *(shape + amount * roughness for amount in ROUGHEN_LADDER),
    ])
    matched = match_histogram(candidates, reference, rng, tiebreak)
    return matched[np.argmin(np.abs(local_contrast(matched) - local_contrast(reference)))]


# How busy an OOD image is (a grating's period, a noise image's grain, a letter's or an overlay's
# number of strokes) moves a plain CNN's energy (docs/digits-study.md), so every set's local
# contrast is matched to its reference digit's, except for these: a digit turned or flipped is a
# digit's own pixels moved, whose neighbours differ exactly as much as before.
OWN_LOCAL_CONTRAST = frozenset({"rotated", "flipped"})
BLUR_LADDER = (2.0, 1.5, 1.2, 1.0, 0.8, 0.6, 0.45, 0.3, 0.15)  # Gaussian sigmas in pixels, smoothest first
ROUGHEN_LADDER = (0.05, 0.1, 0.2, 0.35, 0.5, 0.75, 1.0, 1.5, 2.0, 3.0)  # noise / the shape's std


# --- shape generators: (rng, count, split, (digit levels, labels)) -> float [count, 8, 8] -----


def make_letters(rng, count, split, digits) -> np.ndarray:
    fonts = [ImageFont.truetype(str(_font_path(name)), 96) for name in FONT_FILES]
    images = []
    for _ in range(count):
        glyph = _render_glyph(
            split.letters[rng.integers(len(split.letters))],
            fonts[rng.integers(len(fonts))],
            stroke=int(rng.integers(0, 3)),
            angle=rng.uniform(-15, 15),
            shear=rng.uniform(-0.25, 0.25),
        )
        bitmap = _fit_bitmap(glyph, height=rng.uniform(0.94, 1.0), shift=int(rng.integers(-2, 3)))
        images.append(_block_count(bitmap))
    return np.stack(images).astype(np.float64)


def make_rotated(rng, count, split, digits) -> np.ndarray:
    """Digits turned by 90 degrees, clockwise or counter-clockwise."""
    images, labels = digits
    pool = np.flatnonzero(np.isin(labels, ROTATED_CLASSES))
    picked = rng.choice(pool, size=count)
    turns = rng.choice([1, 3], size=count)
    return np.stack([np.rot90(images[i], k) for i, k in zip(picked, turns)]).astype(np.float64)


def make_flipped(rng, count, split, digits) -> np.ndarray:
    """Digits upside down or mirrored, each flip only for the classes it does not map to a digit."""
    images, labels = digits
    flips = list(FLIPS)
    result = []
    for _ in range(count):
        flip = flips[rng.integers(len(flips))]
        image = images[rng.choice(np.flatnonzero(np.isin(labels, FLIPS[flip])))]
        result.append(image[::-1, :] if flip == "upside_down" else image[:, ::-1])
    return np.stack(result).astype(np.float64)


def make_overlaid(rng, count, split, digits) -> np.ndarray:
    """Two digits of different classes, pixel by pixel the brighter of the two."""
    images, labels = digits
    pairs = [(a, b) for a in range(10) for b in range(a + 1, 10) if (a, b) not in OVERLAY_EXCLUDED]
    result = []
    for _ in range(count):
        a, b = pairs[rng.integers(len(pairs))]
        first, second = (images[rng.choice(np.flatnonzero(labels == c))] for c in (a, b))
        result.append(np.maximum(first, second))
    return np.stack(result).astype(np.float64)


def make_photos(rng, count, split, digits) -> np.ndarray:
    photos = [_photo(name) for name in split.photos]
    images = []
    for _ in range(count):
        photo = photos[rng.integers(len(photos))]
        side = int(rng.integers(24, 160))
        left, top = int(rng.integers(photo.width - side)), int(rng.integers(photo.height - side))
        patch = photo.crop((left, top, left + side, top + side)).resize((8, 8), Image.BOX)
        # Light or dark on either: which way round a photo is bright says nothing about ink.
        patch = np.asarray(patch, np.float64)
        images.append(patch if rng.random() < 0.5 else -patch)
    return np.stack(images)


def make_textures(rng, count, split, digits) -> np.ndarray:
    y, x = np.mgrid[0:BITMAP, 0:BITMAP].astype(np.float64)
    kinds = [TEXTURES[name] for name in split.textures]
    return np.stack([_block_mean(kinds[rng.integers(len(kinds))](rng, x, y)) for _ in range(count)])


def make_noise(rng, count, split, digits) -> np.ndarray:
    images = []
    for _ in range(count):
        noise = rng.uniform(0, 1, (8, 8)) if rng.random() < 0.5 else rng.normal(0.5, 0.25, (8, 8))
        if rng.random() < 0.5:
            noise = gaussian_filter(noise, rng.uniform(0.5, 1.0))
        images.append(noise)
    return np.stack(images)


OOD_GENERATORS = {
    "letters": make_letters,
    "rotated": make_rotated,
    "flipped": make_flipped,
    "overlaid": make_overlaid,
    "photos": make_photos,
    "textures": make_textures,
    "noise": make_noise,
}


# --- global-statistics sets: (rng, count, split, (digit levels, labels), envelope) -> int levels [count, 8, 8]


@dataclass(frozen=True)
class Envelope:
    """The global pixel statistics every training digit shares (levels 0..16)."""

    mean_low: float  # the lowest mean ink level of a training digit
    mean_high: float  # the highest
    brightest_low: int  # the lowest brightest pixel of a training digit (every digit also has a 0 pixel)


def digit_envelope(levels: np.ndarray) -> Envelope:
    levels = np.asarray(levels)
    means = levels.mean((-2, -1))
    return Envelope(float(means.min()), float(means.max()), int(levels.max((-2, -1)).min()))


def differs_globally(levels: np.ndarray, envelope: Envelope) -> np.ndarray:
    """Per image [..., 8, 8]: outside the digits' envelope, so a global statistic alone tells it apart:
    no pixel at 0, or no pixel as bright as every digit's brightest, or a mean ink level outside theirs."""
    levels = np.asarray(levels)
    means = levels.mean((-2, -1))
    return (levels.min((-2, -1)) > 0) | (levels.max((-2, -1)) < envelope.brightest_low) | (means < envelope.mean_low) | (means > envelope.mean_high)


def _until_outside(draw, rng, count: int, envelope: Envelope) -> np.ndarray:
    """`count` images of `draw(rng)`, each redrawn until it lies outside the envelope."""
    images = []
    while len(images) < count:
        image = np.clip(np.round(draw(rng)), 0, LEVELS).astype(np.int64)
        if differs_globally(image, envelope):
            images.append(image)
    return np.stack(images)


def make_flat(rng, count, split, digits, envelope) -> np.ndarray:
    """Constant images, or ramps between two of the split's levels across the image in any direction."""
    y, x = np.mgrid[0:8, 0:8] / 7.0

    def draw(rng):
        first, second = rng.choice(split.flat_levels, size=2)
        if rng.random() < 0.5:
            return np.full((8, 8), float(first))
        theta = rng.uniform(0, 2 * np.pi)
        along = x * np.cos(theta) + y * np.sin(theta)
        along = (along - along.min()) / (np.ptp(along) or 1.0)
        return first + (second - first) * along

    return _until_outside(draw, rng, count, envelope)


def _digit_drawer(digits, transform):
    images, _ = digits
    return lambda rng: transform(rng, images[rng.integers(len(images))].astype(np.float64))


def make_faint(rng, count, split, digits, envelope) -> np.ndarray:
    """Digits at 10-50% of their contrast, on a ground anywhere from black to the grey that keeps them in range."""

    def faint(rng, digit):
        contrast = rng.uniform(0.1, 0.5)
        return rng.uniform(0, LEVELS * (1 - contrast)) + contrast * digit

    return _until_outside(_digit_drawer(digits, faint), rng, count, envelope)


def make_bright(rng, count, split, digits, envelope) -> np.ndarray:
    """Digits washed out: full-contrast ink on a ground of level 4-12, what overexposure does."""

    def bright(rng, digit):
        ground = rng.uniform(4, 12)
        return ground + (LEVELS - ground) * digit / LEVELS

    return _until_outside(_digit_drawer(digits, bright), rng, count, envelope)


def make_inverted(rng, count, split, digits, envelope) -> np.ndarray:
    """Digits in negative: dark strokes on a white ground."""
    return _until_outside(_digit_drawer(digits, lambda rng, digit: LEVELS - digit), rng, count, envelope)


def make_static(rng, count, split, digits, envelope) -> np.ndarray:
    """Uniform noise of one of the split's grains, about a mean level of 0-16, at most 6 levels either way."""

    def draw(rng):
        grain = int(rng.choice(split.noise_grains))
        cells = rng.uniform(-1, 1, (8 // grain, 8 // grain)) * rng.uniform(0.5, 6)
        return rng.uniform(0, LEVELS) + np.kron(cells, np.ones((grain, grain)))

    return _until_outside(draw, rng, count, envelope)


STATISTICS_GENERATORS = {
    "flat": make_flat,
    "faint": make_faint,
    "bright": make_bright,
    "inverted": make_inverted,
    "static": make_static,
}


# --- textures: (rng, x, y) -> float [32, 32] on the bitmap grid ------------------------------


def _rotated_axes(rng, x, y):
    theta = rng.uniform(0, np.pi)
    return x * np.cos(theta) + y * np.sin(theta), -x * np.sin(theta) + y * np.cos(theta)


def _grating(rng, x, y):
    """Sine or square wave, period 5..16 bitmap pixels."""
    along, _ = _rotated_axes(rng, x, y)
    wave = np.sin(2 * np.pi * along / rng.uniform(5, 16) + rng.uniform(0, 2 * np.pi))
    return (wave > 0).astype(np.float64) if rng.random() < 0.5 else wave


def _checkerboard(rng, x, y):
    along, across = _rotated_axes(rng, x, y)
    cell = rng.uniform(3, 10)
    return ((np.floor(along / cell) + np.floor(across / cell)) % 2).astype(np.float64)


def _blobs(rng, x, y):
    texture = np.zeros_like(x)
    for _ in range(rng.integers(2, 7)):
        cx, cy, sigma = rng.uniform(0, BITMAP), rng.uniform(0, BITMAP), rng.uniform(2, 7)
        texture += np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))
    return texture


def _rings(rng, x, y):
    """Concentric rings about a centre anywhere within a bitmap's width of the image."""
    cx, cy = rng.uniform(-BITMAP / 2, 1.5 * BITMAP, size=2)
    return np.sin(2 * np.pi * np.hypot(x - cx, y - cy) / rng.uniform(5, 14) + rng.uniform(0, 2 * np.pi))


def _plaid(rng, x, y):
    """The sum of two sine gratings at independent angles and periods."""
    first, _ = _rotated_axes(rng, x, y)
    second, _ = _rotated_axes(rng, x, y)
    return np.sin(2 * np.pi * first / rng.uniform(6, 16)) + np.sin(2 * np.pi * second / rng.uniform(6, 16))


def _zigzag(rng, x, y):
    """Chevrons: a square wave whose phase follows a triangle wave across it."""
    along, across = _rotated_axes(rng, x, y)
    period = rng.uniform(8, 16)
    triangle = np.abs((across / period) % 2 - 1)
    return (np.sin(2 * np.pi * (along + rng.uniform(3, 8) * triangle) / rng.uniform(5, 12)) > 0).astype(np.float64)


TEXTURES = {"grating": _grating, "checkerboard": _checkerboard, "blobs": _blobs, "rings": _rings, "plaid": _plaid, "zigzag": _zigzag}


# --- the two splits ------------------------------------------------------------------------

# Files of bundled photographs: scikit-learn's two sample images and matplotlib's sample photo.
PHOTO_FILES = {"china": "sklearn:china.jpg", "flower": "sklearn:flower.jpg", "grace_hopper": "matplotlib:grace_hopper.jpg"}

TEST = OodSplit(
    "test", LETTERS[0::2], ("china", "flower"), ("grating", "checkerboard", "blobs"), digits="test",
    flat_levels=tuple(range(0, LEVELS + 1, 2)), noise_grains=(1, 4),
)
VALIDATION = OodSplit(
    "validation", LETTERS[1::2], ("grace_hopper",), ("rings", "plaid", "zigzag"), digits="train",
    flat_levels=tuple(range(1, LEVELS, 2)), noise_grains=(2,),
)


# --- helpers --------------------------------------------------------------------------------


def _rng(seed: int, name: str) -> np.random.Generator:
    # crc32, not hash(): Python salts string hashes per process, which would break determinism.
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def _blur(images: np.ndarray, sigma: float) -> np.ndarray:
    """scipy's `gaussian_filter` of each image of a stack [..., H, W] (none across images)."""
    images = np.asarray(images, np.float64)
    return gaussian_filter(images, sigma=(0.0,) * (images.ndim - 2) + (sigma, sigma))


def _font_path(name: str) -> Path:
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name


@cache
def _photo(name: str) -> Image.Image:
    """One bundled photograph, grayscale."""
    library, file = PHOTO_FILES[name].split(":")
    if library == "sklearn":
        from sklearn.datasets import load_sample_image

        return Image.fromarray(load_sample_image(file)).convert("L")
    import matplotlib

    with Image.open(Path(matplotlib.get_data_path()) / "sample_data" / file) as photo:
        return photo.convert("L")


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


def _levels_to_uint8(levels: np.ndarray) -> np.ndarray:
    return np.round(np.asarray(levels, np.float64) * 255 / LEVELS).astype(np.uint8)


def _uint8_to_levels(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 8, 8, 1] on the 17 levels -> int levels 0..16 [N, 8, 8]."""
    return np.round(images[..., 0].astype(np.float64) * LEVELS / 255).astype(np.int64)


# Test and validation have the same sets (from disjoint sources: OodSplit), in three groups.
OOD_SETS = {
    "letters": "near", "rotated": "near", "flipped": "near", "overlaid": "near",
    "photos": "far", "textures": "far", "noise": "far",
    **dict.fromkeys(STATISTICS_GENERATORS, "stats"),
}

DIGITS = register(
    Benchmark(
        name="digits",
        class_names=("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
        image_size=8,
        channels=1,
        ood_sets=OOD_SETS,
        validation_ood_sets=OOD_SETS,
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
