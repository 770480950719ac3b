"""Classifier architectures, all behind one interface.

Every model takes images in [0, 1] (input normalisation is part of the model, so scores
such as ODIN perturb pixels directly), returns logits from `forward`, and exposes the
penultimate features through `features` for the Mahalanobis and KNN scores.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import torch
import torchvision
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from ncis import registry
from ncis.datasets import Benchmark, image_folder
from ncis.datasets.folders import NumericImageFolder
from ncis.errors import UserError
from ncis.io import load_state, load_weights

class Classifier(nn.Module):
    """normalise -> backbone (penultimate features) -> linear layer (logits)."""

    def __init__(self, backbone: nn.Module, feature_dim: int, num_classes: int, mean: Sequence[float], std: Sequence[float]):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1))
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1))
        self.backbone = backbone
        self.fc = nn.Linear(feature_dim, num_classes)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.backbone((images - self.mean) / self.std)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(self.features(images))


def _conv_bn_relu(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def small_cnn(channels: int) -> tuple[nn.Module, int]:
    """Three 3x3 convolutions and one pooling: enough for 8x8 digits, a few ms per batch on a CPU."""
    backbone = nn.Sequential(
        *_conv_bn_relu(channels, 16),
        *_conv_bn_relu(16, 32),
        nn.MaxPool2d(2),
        *_conv_bn_relu(32, 64),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
    )
    return backbone, 64


def resnet34_cifar(channels: int) -> tuple[nn.Module, int]:
    """torchvision's ResNet-34 with the CIFAR stem: 3x3 stride-1 first conv, no max-pool."""
    net = torchvision.models.resnet34()
    net.conv1 = nn.Conv2d(channels, 64, kernel_size=3, stride=1, padding=1, bias=False)
    nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
    net.maxpool = nn.Identity()
    feature_dim = net.fc.in_features
    net.fc = nn.Identity()  # the logits layer is Classifier.fc
    return net, feature_dim


class _WideBlock(nn.Module):
    """Pre-activation basic block of Zagoruyko & Komodakis, as in Hendrycks' OE code."""

    def __init__(self, c_in: int, c_out: int, stride: int, drop: float):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.drop = drop
        same_shape = c_in == c_out and stride == 1
        self.shortcut = None if same_shape else nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # When the shape changes the shortcut sees the activated input (as in the reference code).
        shortcut = x if self.shortcut is None else self.shortcut(out)
        out = F.relu(self.bn2(self.conv1(out)))
        out = F.dropout(out, p=self.drop, training=self.training)
        return self.conv2(out) + shortcut


class WideResNet(nn.Module):
    """WRN-depth-widen without its logits layer; returns the pooled features."""

    def __init__(self, channels: int, depth: int = 40, widen: int = 2, drop: float = 0.3):
        super().__init__()
        if (depth - 4) % 6:
            raise ValueError("WideResNet depth must be 6n + 4")
        blocks_per_stage = (depth - 4) // 6
        widths = [16, 16 * widen, 32 * widen, 64 * widen]
        layers: list[nn.Module] = [nn.Conv2d(channels, widths[0], 3, padding=1, bias=False)]
        for stage, stride in enumerate((1, 2, 2)):
            for i in range(blocks_per_stage):
                c_in = widths[stage] if i == 0 else widths[stage + 1]
                layers.append(_WideBlock(c_in, widths[stage + 1], stride if i == 0 else 1, drop))
        layers += [nn.BatchNorm2d(widths[3]), nn.ReLU(inplace=True), nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.layers = nn.Sequential(*layers)
        self.out_features = widths[3]
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


def wrn40_2(channels: int) -> tuple[nn.Module, int]:
    # Dropout 0.3: the default of Hendrycks' OE code when training from scratch.
    net = WideResNet(channels, depth=40, widen=2, drop=0.3)
    return net, net.out_features



def build_classifier(
    arch: str,
    num_classes: int,
    channels: int,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
) -> Classifier:
    try:
        builder = registry.resolve(registry.ARCHITECTURES, arch, "classifier.arch")
    except ValueError as err:
        raise UserError(str(err)) from None
    backbone, feature_dim = builder(channels)
    mean = list(mean) if mean is not None else [0.5] * channels
    std = list(std) if std is not None else [0.5] * channels
    return Classifier(backbone, feature_dim, num_classes, mean, std)


def folder_config(arch: str, benchmark: Benchmark, mean: Sequence[float], std: Sequence[float]) -> dict:
    """What a classifier folder's config.json says of its model: enough to rebuild it and to check
    it fits a benchmark (train-classifier and import-classifier add their own keys)."""
    return {
        "arch": arch,
        "benchmark": benchmark.name,
        "num_classes": benchmark.num_classes,
        "channels": benchmark.channels,
        "image_size": benchmark.image_size,
        "mean": list(mean),
        "std": list(std),
    }


def load_classifier(folder: str | Path) -> tuple[Classifier, dict]:
    """The classifier `train-classifier` saved (on the CPU, in eval mode) and its config."""
    folder = Path(folder)
    if not (folder / "model.safetensors").exists():
        raise UserError(f"{folder} holds no classifier; run `ncis train-classifier` first")
    state, config = load_weights(folder, required=("arch", "num_classes", "channels", "mean", "std"))
    model = build_classifier(config["arch"], config["num_classes"], config["channels"], config["mean"], config["std"])
    load_state(model, state, folder / "model.safetensors")
    return model.eval(), config


# --- input pipeline: PIL image -> float tensor [C, H, W] in [0, 1] at the benchmark's size ---


class ConvertMode:
    """PIL `convert` to the benchmark's channels (a class, not a lambda, so DataLoader workers can pickle it)."""

    def __init__(self, channels: int):
        self.mode = {1: "L", 3: "RGB"}[channels]

    def __call__(self, image):
        return image if image.mode == self.mode else image.convert(self.mode)


def _augmentation(benchmark: Benchmark, augment: str) -> list:
    """`crop`: padded random crop (CIFAR's, train_ood_det_cifar100.py:107); `resized_crop`: random
    resized crop (ImageNet's, train_ood_det_in100.py:127, 170); each then a flip where images allow it."""
    size = benchmark.image_size
    # Digits are not mirror-symmetric; natural images (32 px and up) are.
    if augment == "resized_crop":
        steps: list = [transforms.RandomResizedCrop(size)]
    else:
        steps = [transforms.RandomCrop(size, padding=max(1, size // 8))]
    if size >= 32:
        steps.append(transforms.RandomHorizontalFlip())
    return steps


def eval_transform(benchmark: Benchmark):
    size = benchmark.image_size
    return transforms.Compose([ConvertMode(benchmark.channels), transforms.Resize((size, size)), transforms.ToTensor()])


def train_transform(benchmark: Benchmark, augment: str = "crop"):
    size = benchmark.image_size
    # RandomResizedCrop resizes by itself.
    resize = [] if augment == "resized_crop" else [transforms.Resize((size, size))]
    return transforms.Compose([ConvertMode(benchmark.channels), *resize, *_augmentation(benchmark, augment), transforms.ToTensor()])


def outlier_transform(benchmark: Benchmark, augment: str = "crop"):
    """Synthetic outliers come at any size: `crop` resizes each with a random choice of nearest or
    bilinear (train_ood_det_cifar100.py:127-135), `resized_crop` crops them like the ID images."""
    if augment == "resized_crop":
        return train_transform(benchmark, augment)
    size = benchmark.image_size
    resize = transforms.RandomChoice(
        [
            transforms.Resize((size, size), interpolation=InterpolationMode.NEAREST),
            transforms.Resize((size, size), interpolation=InterpolationMode.BILINEAR),
        ]
    )
    return transforms.Compose([ConvertMode(benchmark.channels), resize, *_augmentation(benchmark, augment), transforms.ToTensor()])


def open_images(folder: str | Path, transform, stage: str) -> NumericImageFolder:
    """An ImageFolder read lazily (sets of any size); missing or empty -> UserError naming `stage`."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder} is missing; run `ncis {stage}` first")
    try:
        return image_folder(folder, transform)
    except FileNotFoundError as err:
        raise UserError(f"{folder} holds no images ({err}); run `ncis {stage}` again") from None


def loader_workers(setting: int | str, device: torch.device) -> int:
    """`classifier.num_workers`: auto = workers only to feed a GPU; on the CPU they compete with training."""
    if setting != "auto":
        return int(setting)
    return 0 if device.type == "cpu" else min(8, os.cpu_count() or 1)


def make_loader(
    dataset: Dataset,
    batch_size: int,
    device: torch.device,
    generator: torch.Generator | None = None,
    sampler=None,
    workers: int | str = "auto",
) -> DataLoader:
    """Shuffled when a generator is given, or in the order of `sampler` (a rank's share under
    torchrun); pinned memory on CUDA."""
    workers = loader_workers(workers, device)
    shuffle = generator is not None or sampler is not None
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle if sampler is None else None,
        sampler=sampler,
        generator=generator if sampler is None else None,
        num_workers=workers,
        pin_memory=device.type == "cuda",
        persistent_workers=workers > 0,
        # A last batch of one image breaks BatchNorm; a shuffled set loses a different remainder each epoch.
        drop_last=shuffle and len(sampler if sampler is not None else dataset) >= batch_size,
    )
