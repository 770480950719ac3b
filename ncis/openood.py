"""OpenOOD v1.5's CIFAR-100 benchmark, read from OpenOOD's own distribution (evaluate.protocol=openood_v1.5).

Citations are to Jingkang50/OpenOOD@3c35632 (read, not copied):

- lists and folders: openood/evaluation_api/datasets.py:85-143 (DATA_INFO['cifar100']), the same as
  configs/datasets/cifar100/cifar100.yml and cifar100_ood.yml: every path in a list is relative to
  `<root>/images_classic/`, every list lives in `<root>/benchmark_imglist/cifar100/`;
- the list format: openood/datasets/imglist_dataset.py:59-93, one "<relative path> <extra>" per line,
  split at the first space, <extra> a Python literal: an int label, or a dict (label 0);
- preprocessing: openood/evaluation_api/preprocessor.py:8-17, 52-60: RGB, bilinear resize of the
  shorter side to 32, centre crop 32, then OpenOOD's CIFAR-100 mean/std. ncis models normalise
  their input themselves (ncis/classifiers.py Classifier), so the images stop at [0, 1] here and
  each classifier applies the mean/std it was trained with;
- metrics: openood/evaluators/metrics.py:40-61, where OOD is the positive class (see `metrics`);
- the table: openood/evaluation_api/evaluator.py:296-317 and scripts/eval_ood.py:201-219.
"""

from __future__ import annotations

import ast
import contextlib
import csv
from pathlib import Path

import numpy as np
from sklearn import metrics as skm
from torch.utils.data import Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from ncis.errors import UserError
from ncis.io import atomic_path, read_image
from ncis.metrics import METRIC_NAMES, average, checked_scores

NAME = "openood_v1.5"
LIST_DIR = "benchmark_imglist/cifar100"
IMAGE_DIR = "images_classic"  # every cifar100 list's data_dir (datasets.py:85-143)
IMAGE_SIZE = 32  # pre_size and img_size of preprocessor.py:13-17

ID_TRAIN, ID_VAL, ID_TEST = "train_cifar100.txt", "val_cifar100.txt", "test_cifar100.txt"
# set -> (group, list); near then far, in OpenOOD's order (cifar100_ood.yml, the rows of its table)
OOD_SETS = {
    "cifar10": ("near", "test_cifar10.txt"),
    "tin": ("near", "test_tin.txt"),  # TinyImageNet less the classes CIFAR shares, as OpenOOD lists it
    "mnist": ("far", "test_mnist.txt"),
    "svhn": ("far", "test_svhn.txt"),
    "texture": ("far", "test_texture.txt"),
    "places365": ("far", "test_places365.txt"),
}
# OpenOOD's OOD validation split (cifar100_ood.yml `val`), scored against its ID validation list:
# the pair OpenOOD tunes postprocessor settings on (evaluator.py:384-408, hyperparam_search).
VALIDATION_OOD = {"tin": "val_tin.txt"}
GROUP_ROWS = {"near": "nearood", "far": "farood"}
CSV_COLUMNS = ("FPR@95", "AUROC", "AUPR_IN", "AUPR_OUT", "ACC")


def download_hint(root: Path) -> str:
    return (
        f"fetch it with OpenOOD's `python scripts/download/download.py --contents datasets --datasets cifar-100 "
        f"--save_dir {root}` or set evaluate.openood_root"
    )


def list_path(root: Path, name: str) -> Path:
    """A list of OpenOOD's distribution; a missing root or list is one line naming the fix."""
    root = Path(root)
    if not (root / LIST_DIR).is_dir() or not (root / IMAGE_DIR).is_dir():
        raise UserError(f"{root} holds no OpenOOD data (expected {root / LIST_DIR}/ and {root / IMAGE_DIR}/); {download_hint(root)}")
    path = root / LIST_DIR / name
    if not path.is_file():
        raise UserError(f"{path} is missing; {download_hint(root)}")
    return path


def read_list(path: Path) -> list[tuple[str, int]]:
    """(relative path, label) per entry, as ImglistDataset reads them (imglist_dataset.py:59-93): the
    path is everything before the first space (so no path holds one), the rest a Python literal, an
    int label or a dict (label 0). Unlike OpenOOD, which fails on them, blank lines are skipped; a
    Windows line ending is read as OpenOOD reads it (the '\\r' is whitespace to the literal)."""
    entries = []
    for number, line in enumerate(Path(path).read_text().split("\n"), 1):
        if not line.strip():
            continue
        image, _, extra = line.partition(" ")
        where = f"{path}:{number}"
        if image.startswith("/"):
            raise UserError(f"{where}: {image!r} is absolute; OpenOOD's paths are relative to {IMAGE_DIR}/ (fetch the lists again)")
        try:
            value = ast.literal_eval(extra.strip())
        except (ValueError, SyntaxError):
            raise UserError(f"{where}: expected '<path> <label>', got {line.strip()!r}; fetch the lists again") from None
        if isinstance(value, dict):
            label = 0  # imglist_dataset.py:86-93 sets label 0 after reading a dict's keys
        elif isinstance(value, int) and not isinstance(value, bool):
            label = value
        else:
            raise UserError(f"{where}: label {extra.strip()!r} is neither an int nor a dict; fetch the lists again")
        entries.append((image, label))
    if not entries:
        raise UserError(f"{path} lists no images; fetch the lists again")
    return entries


def transform():
    """OpenOOD's CIFAR-100 test preprocessing (preprocessor.py:52-60) up to its Normalize (see the module doc)."""
    return transforms.Compose(
        [
            transforms.Resize(IMAGE_SIZE, interpolation=InterpolationMode.BILINEAR),
            transforms.CenterCrop(IMAGE_SIZE),
            transforms.ToTensor(),
        ]
    )


@contextlib.contextmanager
def _truncated_images_allowed():
    # imglist_dataset.py:11-12 sets this for the whole process; here only while an image is read.
    from PIL import ImageFile

    before, ImageFile.LOAD_TRUNCATED_IMAGES = ImageFile.LOAD_TRUNCATED_IMAGES, True
    try:
        yield
    finally:
        ImageFile.LOAD_TRUNCATED_IMAGES = before


class ImageList(Dataset):
    """The images of one OpenOOD list, every entry in list order: (image tensor, label)."""

    def __init__(self, root: Path, name: str, image_transform=None):
        self.list = list_path(root, name)
        self.entries = read_list(self.list)
        self.folder = Path(root) / IMAGE_DIR
        self.transform = image_transform
        for image, _ in self.entries:  # before any scoring starts
            if not (self.folder / image).is_file():
                raise UserError(f"{self.folder / image} (listed in {self.list}) is missing; {download_hint(Path(root))}")

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int):
        image, label = self.entries[index]
        with _truncated_images_allowed():
            picture = read_image(self.folder / image, "RGB")  # imglist_dataset.py:83: convert('RGB')
        return (self.transform(picture) if self.transform else picture), label


# ---------------------------------------------------------------- metrics


def metrics(id_scores, ood_scores) -> dict[str, float]:
    """OpenOOD's four numbers (metrics.py:40-61), higher score = more ID, as fractions.

    OOD is the positive class: fpr95 is the fraction of ID images flagged as OOD at the first
    threshold that flags at least 95% of the OOD images (ncis.metrics.fpr_at_tpr, the paper's,
    counts OOD images kept at 95% of ID kept); AUPR-In and AUPR-Out are trapezoidal areas under
    precision-recall curves (sklearn's `auc`), not average precision. AUROC is the same either way.
    """
    id_scores, ood_scores = checked_scores(id_scores, ood_scores)
    conf = np.concatenate([id_scores, ood_scores])
    ood = np.concatenate([np.zeros(id_scores.size), np.ones(ood_scores.size)])
    fpr, tpr, _ = skm.roc_curve(ood, -conf)
    precision_in, recall_in, _ = skm.precision_recall_curve(1 - ood, conf)
    precision_out, recall_out, _ = skm.precision_recall_curve(ood, -conf)
    return {
        "fpr95": float(fpr[np.argmax(tpr >= 0.95)]),
        "auroc": float(skm.auc(fpr, tpr)),
        "aupr_in": float(skm.auc(recall_in, precision_in)),
        "aupr_out": float(skm.auc(recall_out, precision_out)),
    }


def build_report(score: str, id_accuracy: float, id_scores, ood_scores: dict, sizes: dict, validation: dict | None = None) -> dict:
    """The content of metrics_openood_v1.5.json (docs/contract.md)."""
    ood = {name: {"group": OOD_SETS[name][0], **metrics(id_scores, scores)} for name, scores in ood_scores.items()}
    report = {
        "benchmark": "cifar100",
        "protocol": NAME,
        "score": score,
        "id_accuracy": id_accuracy,
        "ood": ood,
        # unweighted over sets, as OpenOOD averages a group (evaluator.py:366-367)
        "groups": {group: average(e for e in ood.values() if e["group"] == group) for group in GROUP_ROWS},
        "images": sizes,
    }
    if validation:
        report["validation"] = {
            "id": ID_VAL.removesuffix(".txt"),
            "ood": {name: metrics(validation["id"], scores) for name, scores in validation["ood"].items()},
        }
    return report


def table_rows(report: dict) -> list[tuple[str, list[float]]]:
    """OpenOOD's rows in percent: near sets, nearood, far sets, farood; ACC (ID accuracy) on every row."""
    accuracy = 100 * report["id_accuracy"]
    rows = []
    for group, label in GROUP_ROWS.items():
        named = [(name, entry) for name, entry in report["ood"].items() if entry["group"] == group]
        for name, entry in [*named, (label, report["groups"][group])]:
            rows.append((name, [100 * entry[key] for key in METRIC_NAMES] + [accuracy]))
    return rows


def write_csv(path: Path, report: dict) -> None:
    """scripts/eval_ood.py --save-csv's layout (:206-219): an unnamed index column, OpenOOD's columns,
    cells 'mean ± std' over training runs with two decimals; one run here, so std 0.00."""
    with atomic_path(path) as tmp, open(tmp, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, lineterminator="\n")
        writer.writerow(["", *CSV_COLUMNS])
        for name, values in table_rows(report):
            writer.writerow([name, *(f"{value:.2f} \u00b1 {0:.2f}" for value in values)])


def format_table(report: dict) -> str:
    header = f"{'':<12}" + "".join(f"{column:>10}" for column in CSV_COLUMNS)
    lines = [f"OpenOOD v1.5 cifar100: score {report['score']} (in %)", header, "-" * len(header)]
    lines += [f"{name:<12}" + "".join(f"{value:>10.2f}" for value in values) for name, values in table_rows(report)]
    return "\n".join(lines)
