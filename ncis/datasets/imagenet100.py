"""ImageNet-100 (ID) with the OOD sets of the Dream-OOD / NCIS ImageNet-100 benchmark.

The 100 classes are Dream-OOD's (deeplearning-wisc/dream-ood, scripts/generate_in100.py),
which NCIS follows. Display names are Dream-OOD's clean ImageNet names (scripts/classnames.txt);
the token inverted and the synthesis prompt use the paper's own words (TOKEN_NAMES,
PROMPT_NAMES). Nothing is downloaded: place the data under `data.root` (default in
configs/imagenet100.yaml: `datasets/`) as

    <root>/imagenet/train/<wnid>/*.JPEG   ImageNet-1k train (all 1000 classes or just these 100)
    <root>/imagenet/val/<wnid>/*.JPEG     ImageNet-1k validation, sorted into class folders
    <root>/iNaturalist/                   the OOD subsets curated by MOS (Huang & Li, 2021)
    <root>/SUN/
    <root>/Places/
    <root>/dtd/images/                    Describable Textures (DTD)

`prepare` writes every image once as a 224x224 PNG (shorter side resized to 256, then
centre-cropped: the standard ImageNet evaluation view) at the usual Layout paths. Resized
copies rather than symlinks: the data folder stays self-contained for DVC, survives moving
`root`, takes about the disk of the original JPEGs, and every later stage reads it exactly
like CIFAR-100 or digits (fixed-size images, no per-benchmark resizing).

It also keeps the original training files, unchanged, at `Layout.id_train_originals`
(`data/train_originals/<class>/<n>.<ext>`, image n of class c is `data/train/<c>/<n>.png`):
the paper inverts each training image from its original JPEG resized to 512 and centre-cropped
(NCIS scripts/get_embeddings/embed_in100_images_clip.py:96-105), and trains the classifier on
RandomResizedCrop(224) of the originals (scripts/train_ood_det_in100.py:124-131), neither of
which a stored 224 crop can give. The files are hard-linked where `root` and the outputs share
a file system (no extra disk), copied otherwise (about 14 GB for the 100 classes).

Groups: SUN and Places are "near" because they are scene photographs of the same kind as
several ID classes (library, church, barn, movie theater, castle, dam, ...); iNaturalist
(plants) and Textures share nothing with the ID classes and are "far".
"""

from __future__ import annotations

from ncis.datasets import Benchmark, register
from ncis.datasets.files import data_root, image_files, link_or_copy_files, require, write_resized_folder
from ncis.errors import UserError
from ncis.io import atomic_path
from ncis.layout import Layout

# wnid -> display name, in class-index order (sorted wnids, as ImageFolder would order them).
CLASSES = {
    "n01498041": "stingray", "n01514859": "hen", "n01582220": "magpie", "n01608432": "kite (bird of prey)",
    "n01616318": "vulture", "n01687978": "agama", "n01776313": "tick", "n01806567": "quail",
    "n01833805": "hummingbird", "n01882714": "koala", "n01910747": "jellyfish", "n01944390": "snail",
    "n01985128": "crayfish", "n02007558": "flamingo", "n02071294": "killer whale", "n02085620": "Chihuahua",
    "n02114855": "coyote", "n02123045": "tabby cat", "n02128385": "leopard", "n02129165": "lion",
    "n02129604": "tiger", "n02165456": "ladybug", "n02190166": "fly", "n02219486": "ant",
    "n02226429": "grasshopper", "n02279972": "monarch butterfly", "n02317335": "starfish", "n02326432": "hare",
    "n02342885": "hamster", "n02363005": "beaver", "n02391049": "zebra", "n02395406": "pig",
    "n02403003": "ox", "n02422699": "impala (antelope)", "n02442845": "mink", "n02444819": "otter",
    "n02480855": "gorilla", "n02510455": "giant panda", "n02640242": "sturgeon", "n02672831": "accordion",
    "n02687172": "aircraft carrier", "n02701002": "ambulance", "n02730930": "apron", "n02769748": "backpack",
    "n02782093": "balloon", "n02787622": "banjo", "n02793495": "barn", "n02799071": "baseball",
    "n02802426": "basketball", "n02814860": "lighthouse", "n02840245": "ring binder", "n02906734": "broom",
    "n02948072": "candle", "n02980441": "castle", "n02999410": "chain", "n03014705": "storage chest",
    "n03028079": "church", "n03032252": "movie theater", "n03125729": "cradle", "n03160309": "dam",
    "n03179701": "desk", "n03220513": "dome", "n03249569": "drum", "n03291819": "envelope",
    "n03384352": "forklift", "n03388043": "fountain", "n03450230": "gown", "n03481172": "hammer",
    "n03594734": "jeans", "n03594945": "jeep", "n03627232": "knot", "n03642806": "laptop computer",
    "n03649909": "lawn mower", "n03661043": "library", "n03676483": "lipstick", "n03724870": "mask",
    "n03733281": "maze", "n03759954": "microphone", "n03761084": "microwave oven", "n03773504": "missile",
    "n03804744": "metal nail", "n03916031": "perfume", "n03938244": "pillow", "n04004767": "printer",
    "n04026417": "purse", "n04090263": "rifle", "n04133789": "sandal", "n04153751": "screw",
    "n04296562": "stage", "n04330267": "stove", "n04371774": "swing", "n04404412": "television",
    "n04465501": "tractor", "n04485082": "tripod", "n04507155": "umbrella", "n04536866": "violin",
    "n04579432": "whistle", "n04606251": "shipwreck", "n07714990": "broccoli", "n07745940": "strawberry",
}  # fmt: skip

# The paper's single words per class, in CLASSES order (NCIS, LarsDoorenbos/NCIS@42fb174,
# scripts/get_embeddings/embed_in100_images_clip.py:40-60, the same list as
# ldm/modules/encoders/modules.py:263-283 and scripts/dream_ood.py:54-74): the first token of each
# is the token inverted by `embed` ("An image of a orca") and swapped by `synthesize`.
TOKEN_NAMES = (
    "stingray", "hen", "magpie", "kite", "vulture", "agama", "tick", "quail", "hummingbird", "koala",
    "jellyfish", "snail", "crawfish", "flamingo", "orca", "chihuahua", "coyote", "tabby", "leopard", "lion",
    "tiger", "ladybug", "fly", "ant", "grasshopper", "monarch", "starfish", "hare", "hamster", "beaver",
    "zebra", "pig", "ox", "impala", "mink", "otter", "gorilla", "panda", "sturgeon", "accordion",
    "carrier", "ambulance", "apron", "backpack", "balloon", "banjo", "barn", "baseball", "basketball", "beacon",
    "binder", "broom", "candle", "castle", "chain", "chest", "church", "cinema", "cradle", "dam",
    "desk", "dome", "drum", "envelope", "forklift", "fountain", "gown", "hammer", "jean", "jeep",
    "knot", "laptop", "mower", "library", "lipstick", "mask", "maze", "microphone", "microwave", "missile",
    "nail", "perfume", "pillow", "printer", "purse", "rifle", "sandal", "screw", "stage", "stove",
    "swing", "television", "tractor", "tripod", "umbrella", "violin", "whistle", "wreck", "broccoli", "strawberry",
)  # fmt: skip

# The paper's names in the synthesis prompt "A high-quality image of the <name>": the same words
# plus its suffixes for classes Stable Diffusion otherwise draws as something else (NCIS
# scripts/dream_ood.py:503-514, from Dream-OOD). One departure: for "nail" the reference appends
# a second sentence without a space ("... of the nailA high-quality image of the wire nail");
# ncis uses the evident intent, "wire nail".
SUFFIXES = {"kite": " bird", "quail": " bird", "chest": " box", "tick": " bite", "stingray": " in the water",
            "ox": " animal", "impala": " animal"}  # fmt: skip
PROMPT_NAMES = tuple("wire nail" if name == "nail" else name + SUFFIXES.get(name, "") for name in TOKEN_NAMES)

IMAGE_SIZE = 224
RESIZE = 256  # shorter side before the centre crop
OOD_FOLDERS = {"inaturalist": "iNaturalist", "sun": "SUN", "places": "Places", "textures": "dtd/images"}


def prepare_data(params, layout: Layout) -> None:
    root = data_root(params)
    imagenet = root / "imagenet"
    # Check every source before the long write, so a missing folder fails in a second, not an hour.
    splits = {}
    for split in ("train", "val"):
        base = require(imagenet / split, f"place ImageNet-1k's {split} split (class folders) under {imagenet / split} or set data.root")
        missing = [wnid for wnid in CLASSES if not (base / wnid).is_dir()]
        if missing:
            raise UserError(f"{base / missing[0]} is missing ({len(missing)} ImageNet-100 classes absent); place ImageNet-1k's {split} class folders there")
        splits[split] = base
    folders = {name: require(root / sub, f"place the {name} OOD images under {root / sub} or set data.root") for name, sub in OOD_FOLDERS.items()}

    with atomic_path(layout.data) as staging_data:
        staging = Layout(staging_data.parent)  # its `data` is the staging folder (see digits.py)
        for split, target in (("train", staging.id_train), ("val", staging.id_test)):
            for index, wnid in enumerate(CLASSES):
                files = image_files(splits[split] / wnid)
                write_resized_folder(files, target / str(index), RESIZE, IMAGE_SIZE)
                if split == "train":
                    link_or_copy_files(files, staging.id_train_originals / str(index))
        for name, source in folders.items():
            write_resized_folder(image_files(source), staging.ood(name) / "0", RESIZE, IMAGE_SIZE)


IMAGENET100 = register(
    Benchmark(
        name="imagenet100",
        class_names=tuple(CLASSES.values()),
        image_size=IMAGE_SIZE,
        channels=3,
        ood_sets={"inaturalist": "far", "sun": "near", "places": "near", "textures": "far"},
        prepare_data=prepare_data,
        token_names=TOKEN_NAMES,
        prompt_names=PROMPT_NAMES,
        keeps_originals=True,
    )
)
