"""import-classifier: one of the paper's released classifier checkpoints as an ncis classifier folder.

The paper's README (LarsDoorenbos/NCIS@42fb174, README.md:72) links pre-trained classifiers for
both benchmarks. Each file is `torch.save(net.state_dict())` (scripts/train_ood_det_cifar100.py:372-374,
scripts/train_ood_det_in100.py:415-417) of `ResNet_Model('resnet34', num_classes=100)`
(scripts/resnet.py:229-235): `encoder.*` a ResNet-34 with a 3x3 stride-1 stem and no max-pool
(scripts/resnet.py:81-88, 183-184), `fc` a Linear(512, classes). That is ncis's `resnet34`
(`ncis.classifiers.resnet34_cifar`) under other names: torchvision's BasicBlock computes the same
conv-bn-relu-conv-bn + shortcut, relu (scripts/resnet.py:31-40) with the same strides and the same
condition for a projection shortcut (:24-29), which torchvision calls `downsample`, not `shortcut`.

The energy head (`logistic_regression`, scripts/train_ood_det_cifar100.py:210-212) is not in these
files; the energy score needs only the logits. The images are normalised with the paper's fixed
constants (`PAPER_NORMALISATION`), not with statistics ncis would estimate, so the weights see
exactly the inputs they were trained on.

The file is read with `torch.load(weights_only=True)`: its restricted unpickler builds tensors and
containers only, so a file carrying any other object is refused and nothing in it runs. What is
written is the ordinary safetensors + JSON folder of `train-classifier`, so `evaluate` reads it
unchanged.
"""

from __future__ import annotations

import hashlib
import pickle
import re
import zipfile
from pathlib import Path

import torch

from ncis import tracking
from ncis.classifiers import build_classifier, folder_config
from ncis.datasets import get_benchmark
from ncis.errors import UserError
from ncis.io import save_weights
from ncis.layout import layout_for

COMMAND = "import-classifier"
ARCH = "resnet34"  # ResNet_Model('resnet34') of scripts/test_ood_cifar100.py:63 and scripts/test_ood_in100.py:76
PREFIX = "module."  # torch.nn.DataParallel's; the ImageNet-100 energy files lack it (scripts/test_ood_in100.py:81-103)
HEAD_PREFIX = "logistic_regression."  # the paper's energy head, should a file hold it: not needed for the energy score

# benchmark -> (mean, std) of the paper's evaluation transforms, on [0, 1] images.
PAPER_NORMALISATION = {
    # scripts/test_ood_cifar100.py:50-51 (also scripts/train_ood_det_cifar100.py:104-105)
    "cifar100": ([x / 255 for x in (125.3, 123.0, 113.9)], [x / 255 for x in (63.0, 62.1, 66.7)]),
    # scripts/test_ood_in100.py:49-50 (also scripts/train_ood_det_in100.py:109-110)
    "imagenet100": ([0.485, 0.456, 0.406], [0.229, 0.224, 0.225]),
}


def file_sha256(path: Path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_checkpoint(path: Path) -> dict[str, torch.Tensor]:
    """The state dict in `path`, unpickled with `weights_only=True` (tensors and containers only)."""
    if not path.is_file():
        raise UserError(f"{path}: no such checkpoint file; download the paper's classifier (docs/reproducing.md)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as err:
        # The restricted unpickler names the first callable it refused to call.
        refused = re.search(r"GLOBAL ([\w.]+)", str(err))
        if refused:
            raise UserError(
                f"{path} asks to call {refused.group(1)} when loaded (a pickle that could run code), not only to build "
                "tensors; refused, nothing in it was run: import only a state dict of tensors"
            ) from None
        raise UserError(f"{path} is not a PyTorch checkpoint (its pickle is unreadable)") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError) as err:
        raise UserError(f"{path} is not a readable PyTorch checkpoint ({str(err).splitlines()[0][:120]})") from None
    if not isinstance(state, dict) or not state or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds a {type(state).__name__}, not the state dict of tensors torch.save(net.state_dict()) writes")
    return state


def ncis_key(key: str) -> str:
    """A key of the paper's ResNet_Model -> the same tensor's key in ncis's Classifier."""
    if key.startswith("encoder."):
        # The projection shortcut (scripts/resnet.py:26-29) is torchvision's `downsample`.
        return "backbone." + re.sub(r"\.shortcut\.", ".downsample.", key.removeprefix("encoder."))
    return key  # fc.weight, fc.bias: the same name in both


def convert(state: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], path: Path) -> dict[str, torch.Tensor]:
    """`state` renamed to ncis's keys, every key and shape checked against `expected` (ncis's model)."""
    if all(key.startswith(PREFIX) for key in state):
        state = {key.removeprefix(PREFIX): value for key, value in state.items()}
    head = sorted(key for key in state if key.startswith(HEAD_PREFIX))
    if head:
        print(f"{COMMAND}: note: {path.name} holds energy-head weights ({', '.join(head)}); not imported, the energy score needs only the logits")
    converted = {}
    for key, value in state.items():
        if key in head:
            continue
        target = ncis_key(key)
        if target not in expected or target in ("mean", "std"):
            raise UserError(f"{path}: unexpected key {key!r}: not a weight of the paper's ResNet_Model('resnet34') (encoder.*, fc.*)")
        if value.shape != expected[target].shape:
            raise UserError(
                f"{path}: key {key!r} has shape {list(value.shape)}, a ResNet-34 for this benchmark needs {list(expected[target].shape)}"
                + (" (the number of classes differs)" if target.startswith("fc.") else "")
            )
        converted[target] = value
    # BatchNorm's step counter does not enter an eval-mode forward; files from older PyTorch lack it.
    missing = [key for key in expected if key not in converted and key not in ("mean", "std") and not key.endswith(".num_batches_tracked")]
    if missing:
        raise UserError(f"{path}: missing key for {missing[0]!r} ({len(missing)} missing): not a whole ResNet_Model('resnet34') state dict")
    return converted


def run_name(params, checkpoint: Path) -> str:
    """Default MLflow run name: the benchmark and the file imported (the pipeline's name would describe training never run)."""
    return re.sub(r"[^A-Za-z0-9._=+,-]+", "_", f"{params.benchmark}-released-{checkpoint.stem}")


def main(params, checkpoint: str | Path) -> dict:
    # 1. Check inputs: a benchmark the paper released classifiers for, a readable state dict of tensors.
    checkpoint = Path(checkpoint)
    if params.benchmark not in PAPER_NORMALISATION:
        raise UserError(f"{COMMAND}: the paper released classifiers for {' and '.join(PAPER_NORMALISATION)} only, not {params.benchmark!r}")
    benchmark = get_benchmark(params.benchmark)
    state = read_checkpoint(checkpoint)
    digest = file_sha256(checkpoint)

    # 2. ncis's model with the paper's normalisation; the checkpoint's weights, renamed and checked.
    mean, std = PAPER_NORMALISATION[params.benchmark]
    model = build_classifier(ARCH, benchmark.num_classes, benchmark.channels, mean, std)
    weights = convert(state, model.state_dict(), checkpoint)
    model.load_state_dict(model.state_dict() | weights)  # keeps the normalisation buffers (and any absent BN counter)

    # 3. Write the classifier folder (atomically: an existing one is replaced only now) and log it.
    config = {
        **folder_config(ARCH, benchmark, mean, std),
        # The released files hold no energy head (see the module docstring); nothing downstream reads it.
        "energy_head": None,
        "source": {"file": checkpoint.name, "sha256": digest, "code": "LarsDoorenbos/NCIS@42fb174 scripts/resnet.py ResNet_Model('resnet34')"},
    }
    output = layout_for(params).classifier
    save_weights(output, model, config)
    source = {"checkpoint_file": checkpoint.name, "checkpoint_sha256": digest}
    tracking.set_tags(source)
    tracking.log_artifact(output)
    # 4. In the model registry, as `models:/ncis-<benchmark>-classifier@paper` (the model takes [0, 1] images).
    examples = torch.rand(2, benchmark.channels, benchmark.image_size, benchmark.image_size, generator=torch.Generator().manual_seed(0))
    tracking.log_classifier_model(model.eval(), examples, name="model", folder=output)  # beside the artifact classifier/, not in it
    tracking.register_classifier(
        params.benchmark, source, f"The paper's released classifier {checkpoint.name} (sha256 {digest})", alias=tracking.PAPER_ALIAS
    )
    print(f"{COMMAND}: {checkpoint.name} (sha256 {digest[:12]}...) -> {output}")
    return config


def run(params, checkpoint: str | Path, name: str | None = None) -> dict:
    """`main` inside its own MLflow run (`<name>/import-classifier`, tag ncis.stage=import-classifier)."""
    from ncis.signals import in_stage

    with tracking.stage_run(params, COMMAND, name or run_name(params, Path(checkpoint))), in_stage(COMMAND):
        return main(params, checkpoint)
