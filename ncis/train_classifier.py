"""train-classifier: cross-entropy on ID images + an energy regulariser that separates ID from outliers.

The regulariser is a logistic-regression head on the energy E(x) = logsumexp(logits)
(higher = more ID): P(ID | x) = sigmoid(w * E(x) + b), trained jointly with the
classifier on ID (label 1) and outlier (label 0) batches. `energy_head: free` lets w take
either sign, as in the paper's CIFAR-100 code (a Linear(1, 2) head, LarsDoorenbos/NCIS
scripts/train_ood_det_cifar100.py:210-212, 280-290); `monotone` keeps w >= 0 so that P(ID)
never decreases with energy. A free head that turns negative has learned that outliers have
the HIGHER energy, and its gradient then pushes the classifier further that way: we warn and
log it. `mlp` is the paper's ImageNet-100 head, 1 -> 512 -> ReLU -> 2
(scripts/train_ood_det_in100.py:218-222).

`classifier.init` starts from a classifier this stage saved before. The paper's ImageNet-100
recipe is two phases (configs/imagenet100.yaml): the pretrain-classifier stage
(ncis/pretrain_classifier.py) trains with cross-entropy alone, through `train` below, and
`classifier.init: pretrain-classifier` fine-tunes its classifier here with the energy regulariser.

Every epoch writes a checkpoint (safetensors + JSON, no pickle); a stopped run resumes
from the last complete one.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, Subset
from tqdm import tqdm

from ncis import checkpoints, distributed, tracking
from ncis.classifiers import (
    Classifier,
    build_classifier,
    eval_transform,
    folder_config,
    make_loader,
    open_images,
    outlier_transform,
    train_transform,
)
from ncis.datasets import get_benchmark
from ncis.config import PRETRAINED_INIT
from ncis.errors import UserError
from ncis.io import load_state, load_weights, save_weights
from ncis.layout import layout_for
from ncis.metrics import auroc
from ncis.resume import claim, work_key
from ncis.runtime import autocast_dtype, compiled, item_generator, resolve_device, seed_everything, single_cpu_thread
from ncis.scores import energy_score

NORMALISATION_IMAGES = 5000  # mean/std are estimated on at most this many ID training images


# --- energy head --------------------------------------------------------------------------


class ReversedEnergyHeadWarning(UserWarning):
    """The energy head's weight is negative: it treats outliers as having the higher energy."""


class EnergyHead(nn.Module):
    """P(ID | energy) = sigmoid(w * energy + b); `forward` returns the logit w * energy + b."""

    def __init__(self, monotone: bool):
        super().__init__()
        self.monotone = monotone
        # Both modes start at w = 1, the intended direction; only the free head can leave it.
        start = math.log(math.expm1(1.0)) if monotone else 1.0  # softplus(start) = 1
        self.raw_weight = nn.Parameter(torch.tensor(start))
        self.bias = nn.Parameter(torch.tensor(0.0))

    @property
    def weight(self) -> torch.Tensor:
        return F.softplus(self.raw_weight) if self.monotone else self.raw_weight

    def forward(self, energy: torch.Tensor) -> torch.Tensor:
        return self.weight * energy + self.bias


class MLPEnergyHead(nn.Module):
    """The paper's ImageNet-100 head: Linear(1, hidden), ReLU, Linear(hidden, 2); `forward` returns
    the logit of ID, so binary cross-entropy on it equals their two-class cross-entropy."""

    def __init__(self, hidden: int):
        super().__init__()
        self.layers = nn.Sequential(nn.Linear(1, hidden), nn.ReLU(), nn.Linear(hidden, 2))

    def forward(self, energy: torch.Tensor) -> torch.Tensor:
        logits = self.layers(energy.unsqueeze(-1))
        return logits[..., 1] - logits[..., 0]


def build_energy_head(settings) -> nn.Module:
    if settings.energy_head == "mlp":
        return MLPEnergyHead(settings.energy_head_hidden)
    return EnergyHead(monotone=settings.energy_head == "monotone")


def energy_regulariser(head: nn.Module, id_energy: torch.Tensor, outlier_energy: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy of the head: ID energies labelled 1, outlier energies 0."""
    logits = head(torch.cat([id_energy, outlier_energy]))
    targets = torch.cat([torch.ones_like(id_energy), torch.zeros_like(outlier_energy)])
    return F.binary_cross_entropy_with_logits(logits, targets)


def head_report(head: nn.Module, id_energy: torch.Tensor, outlier_energy: torch.Tensor, epoch: int) -> dict[str, float]:
    """The head's direction and how well energy alone separates ID from outliers; warns if reversed."""
    separation = {"energy_head/auroc": auroc(id_energy.numpy(), outlier_energy.numpy())}
    if not isinstance(head, EnergyHead):
        return separation  # an MLP has no single direction
    weight = float(head.weight.detach())
    reversed_ = weight < 0
    if reversed_:
        warnings.warn(
            f"epoch {epoch}: energy head weight w = {weight:.3g} < 0: the head treats outliers as having HIGHER "
            "energy than ID images (reversed); consider classifier.energy_head=monotone",
            ReversedEnergyHeadWarning,
            stacklevel=2,
        )
    return {
        "energy_head/weight": weight,
        "energy_head/bias": float(head.bias.detach()),
        **separation,
        "energy_head/reversed": float(reversed_),
    }


def head_config(head: nn.Module, settings) -> dict:
    """What config.json records about the trained head."""
    config = {"mode": settings.energy_head, "energy_weight": settings.energy_weight}
    if isinstance(head, EnergyHead):
        return config | {"weight": float(head.weight.detach()), "bias": float(head.bias.detach())}
    return config | {"hidden": settings.energy_head_hidden}


# --- data ---------------------------------------------------------------------------------


class NoiseImages(Dataset):
    """Ablation control: fixed noise images of the ID size, alternately Gaussian and uniform."""

    def __init__(self, count: int, channels: int, size: int, seed: int):
        self.count, self.shape, self.seed = count, (channels, size, size), seed

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, index: int):
        generator = item_generator(self.seed, index)
        if index % 2:
            image = torch.rand(self.shape, generator=generator)
        else:
            image = (0.5 + 0.5 * torch.randn(self.shape, generator=generator)).clamp_(0, 1)
        return image, 0


def outlier_dataset(settings, seed: int, layout, benchmark) -> Dataset | None:
    """The outlier images `settings` (a classifier section) asks for; None for outliers=none."""
    if settings.outliers == "none":
        return None
    if settings.outliers == "noise":
        if not settings.max_outliers:
            raise UserError("classifier.outliers=noise draws classifier.max_outliers noise images; set it above 0")
        return NoiseImages(settings.max_outliers, benchmark.channels, benchmark.image_size, seed)
    dataset = open_images(layout.synthetic_images, outlier_transform(benchmark, settings.augment), "synthesize")
    if settings.max_outliers and len(dataset) > settings.max_outliers:
        keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[: settings.max_outliers]
        dataset = Subset(dataset, keep.tolist())
    return dataset


@torch.no_grad()
def channel_stats(dataset: Dataset, seed: int, device: torch.device) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of (a seeded subset of) the ID training images."""
    if len(dataset) > NORMALISATION_IMAGES:
        keep = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:NORMALISATION_IMAGES]
        dataset = Subset(dataset, keep.tolist())
    total = total_sq = None
    pixels = 0
    for images, _ in make_loader(dataset, 256, device):
        images = images.double()
        sums, sums_sq = images.sum(dim=(0, 2, 3)), images.square().sum(dim=(0, 2, 3))
        total = sums if total is None else total + sums
        total_sq = sums_sq if total_sq is None else total_sq + sums_sq
        pixels += images.numel() // images.shape[1]
    mean = total / pixels
    std = (total_sq / pixels - mean.square()).clamp_min(1e-12).sqrt().clamp_min(1e-3)  # a constant channel must not divide by 0
    return mean.tolist(), std.tolist()


def _cycle(loader: DataLoader):
    while True:
        yield from loader


def _epoch_seed(seed: int, epoch: int) -> int:
    return int(np.random.SeedSequence([seed, epoch]).generate_state(1)[0])


# --- checkpoints --------------------------------------------------------------------------


def save_checkpoint(folder: Path, epoch: int, model, head, optimizer, scheduler, meta: dict, keep: int) -> None:
    """Epoch `epoch`'s checkpoint; all but the `keep` newest are deleted (a ResNet-34 one is ~170 MB)."""
    checkpoints.save(folder, "epoch", epoch, modules={"model": model, "head": head}, optimizer=optimizer, scheduler=scheduler, meta=meta, keep=keep)


def resume(folder: Path, key: str, epochs: int, model, head, optimizer, scheduler, device, epochs_key: str = "classifier.epochs") -> tuple[int, dict]:
    """Load the last complete checkpoint of the work `key` (ncis/resume.py; checkpoints of other
    work are discarded); returns (epochs done, their last stats)."""
    found = checkpoints.saved(folder, "epoch") if claim(folder, key) else []
    if not found:
        return 0, {}
    epoch, path = found[-1]
    # A damaged checkpoint is refused first.
    meta, _ = checkpoints.load(path, modules={"model": model, "head": head}, optimizer=optimizer, scheduler=scheduler, device=device)
    if meta["epochs"] != epochs:
        # Its cosine schedule was planned over the old length; stretching it from the middle
        # would give a schedule neither run describes.
        raise UserError(
            f"{folder} holds {epoch} epoch(s) of a {meta['epochs']}-epoch run, whose learning-rate schedule cannot change "
            f"length; set {epochs_key}={meta['epochs']} to finish it, or delete {folder} to train {epochs} epochs from scratch"
        )
    print(f"train-classifier: resuming after epoch {epoch} from {path}")
    return epoch, meta.get("stats", {})


# --- training -----------------------------------------------------------------------------


def batch_loss(model, head, images, labels, outlier_images, energy_weight: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(cross-entropy on the ID images + energy_weight x the energy regulariser, logits of ID then outliers)."""
    count = len(images)
    # One forward pass over ID + outliers, so BatchNorm sees both (as the paper's code does,
    # train_ood_det_cifar100.py:261-267).
    logits = model(images if outlier_images is None else torch.cat([images, outlier_images]))
    loss = F.cross_entropy(logits[:count], labels)
    if outlier_images is not None:
        energy = energy_score(logits)
        loss = loss + energy_weight * energy_regulariser(head, energy[:count], energy[count:])
    return loss, logits


def train_epoch(model, head, optimizer, scheduler, id_loader, outlier_loader, settings, device, epoch: int) -> dict:
    model.train()
    autocast = autocast_dtype(settings.precision, device)
    outliers = _cycle(outlier_loader) if outlier_loader is not None else None
    loss_sum = torch.zeros((), device=device)
    correct = torch.zeros((), device=device, dtype=torch.long)
    seen = 0
    id_energies, outlier_energies = [], []
    progress = tqdm(id_loader, desc=f"epoch {epoch}/{settings.epochs}", leave=False, disable=None)
    for images, labels in progress:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        count = len(images)
        outlier_images = next(outliers)[0].to(device, non_blocking=True) if outliers is not None else None
        if device.type == "cuda":
            images = images.contiguous(memory_format=torch.channels_last)
            outlier_images = outlier_images.contiguous(memory_format=torch.channels_last) if outlier_images is not None else None
        with torch.autocast(device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
            loss, logits = batch_loss(model, head, images, labels, outlier_images, settings.energy_weight)
        logits = logits.float()
        if outliers is not None:
            energy = energy_score(logits.detach())
            id_energies.append(energy[:count])  # kept on the device: no sync per step
            outlier_energies.append(energy[count:])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        distributed.average_gradients(head.parameters())  # the model's are averaged by DDP
        optimizer.step()
        scheduler.step()
        loss_sum += loss.detach() * count
        correct += (logits[:count].argmax(dim=1) == labels).sum()
        seen += count
    stats = {
        "train/loss": float(loss_sum) / seen,
        "train/accuracy": float(correct) / seen,
        "train/lr": scheduler.get_last_lr()[0],
    }
    if not math.isfinite(stats["train/loss"]):
        raise UserError(f"train-classifier diverged in epoch {epoch} (loss is not finite); lower classifier.lr")
    if id_energies:
        stats.update(head_report(head, torch.cat(id_energies).float().cpu(), torch.cat(outlier_energies).float().cpu(), epoch))
    return stats


def _summary(epoch: int, epochs: int, stats: dict) -> str:
    text = f"epoch {epoch}/{epochs}: loss {stats['train/loss']:.4f}, accuracy {stats['train/accuracy']:.3f}"
    if "energy_head/weight" in stats:
        text += f", head w {stats['energy_head/weight']:+.3f}"
    if "energy_head/auroc" in stats:
        text += f", ID-vs-outlier energy AUROC {stats['energy_head/auroc']:.3f}"
    return text


def main(params) -> dict:
    device = resolve_device(params.device)
    # small_cnn's ops on 8x8 images are too small to split across threads: the extra threads
    # only synchronise, which made training ~6x slower on a busy 2-core machine.
    with single_cpu_thread(device, when=params.classifier.arch == "small_cnn"):
        layout = layout_for(params)
        return train(params, params.classifier, device, layout.classifier, layout.classifier_checkpoints)


def init_folder(init: str, layout) -> Path:
    """The folder `classifier.init` names: phase 1's output for `pretrain-classifier`."""
    return layout.pretrained_classifier if init == PRETRAINED_INIT else Path(init)


def read_init(folder: Path, settings, benchmark, layout) -> tuple[dict[str, torch.Tensor], dict]:
    """Weights and config of the classifier `classifier.init` names, checked against this run."""
    if folder.resolve() == layout.classifier.resolve():
        raise UserError(f"classifier.init={folder} is the folder this stage rewrites; copy that classifier elsewhere first")
    if not (folder / "model.safetensors").exists() or not (folder / "config.json").exists():
        if settings.init == PRETRAINED_INIT:
            raise UserError(f"classifier.init={PRETRAINED_INIT}: {folder} holds no phase-1 classifier; run the pretrain-classifier stage first")
        raise UserError(
            f"classifier.init={folder} holds no classifier (model.safetensors + config.json); "
            "train one first, e.g. with classifier.outliers=none"
        )
    weights, config = load_weights(folder, required=("arch", "num_classes", "channels", "image_size", "mean", "std"))
    wanted = {"arch": settings.arch, "num_classes": benchmark.num_classes, "channels": benchmark.channels, "image_size": benchmark.image_size}
    found = {key: config.get(key) for key in wanted}
    if found != wanted:
        raise UserError(f"classifier.init={folder} is a {found} classifier, this run trains a {wanted} one; point it at a matching classifier")
    return weights, config


def build_model(settings, seed: int, layout, benchmark, device) -> tuple[Classifier, list[float], list[float]]:
    """The classifier to train: from `settings.init` if set, else new, normalised with the ID training set's stats."""
    init = init_folder(settings.init, layout) if settings.init else None
    if init:
        weights, config = read_init(init, settings, benchmark, layout)
        mean, std = config["mean"], config["std"]
    else:
        eval_images = open_images(layout.id_train, eval_transform(benchmark), "prepare")
        mean, std = channel_stats(eval_images, seed, device)
    model = build_classifier(settings.arch, benchmark.num_classes, benchmark.channels, mean, std)
    if init:
        load_state(model, weights, init / "model.safetensors")
        tracking.set_tags({"ncis.classifier_init": str(init)})
    return model.to(device), mean, std


def train(params, settings, device: torch.device, output: Path, checkpoint_folder: Path, epochs_key: str = "classifier.epochs", log_model: bool = True) -> dict:
    """Train the classifier `settings` (a classifier section: params.classifier, or phase 1's) into
    `output`, resuming from and checkpointing to `checkpoint_folder`; `epochs_key` names the key
    that sets `settings.epochs`, for messages; `log_model` logs it as an MLflow model too."""
    layout = layout_for(params)
    benchmark = get_benchmark(params.benchmark)
    seed_everything(params.seed)

    # 1. Data and model
    id_folder = benchmark.classifier_train_images(layout, settings.augment)  # ImageNet-100's crops: of the originals
    id_train = open_images(id_folder, train_transform(benchmark, settings.augment), "prepare")
    outliers = outlier_dataset(settings, params.seed, layout, benchmark)
    model, mean, std = build_model(settings, params.seed, layout, benchmark, device)
    head = build_energy_head(settings).to(device)

    # 2. Optimiser, loaders, schedule
    optimizer = torch.optim.SGD(
        [*model.parameters(), *head.parameters()],
        lr=settings.lr,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        nesterov=settings.momentum > 0,  # torch refuses Nesterov without momentum
    )
    # Under torchrun each rank reads its share of the ID and outlier images (DistributedSampler)
    # and DDP averages the gradients: one rank's batch is batch_size images.
    id_generator, outlier_generator = torch.Generator(), torch.Generator()
    id_sampler = distributed.sampler(id_train)
    outlier_sampler = distributed.sampler(outliers) if outliers is not None else None
    id_loader = make_loader(id_train, settings.batch_size, device, id_generator, id_sampler, settings.num_workers)
    outlier_loader = (
        make_loader(outliers, settings.outlier_batch_size, device, outlier_generator, outlier_sampler, settings.num_workers)
        if outliers is not None
        else None
    )
    if device.type == "cuda":  # cuDNN's fastest convolutions take NHWC
        model = model.to(memory_format=torch.channels_last)
    trained = compiled(distributed.parallel(model, device), params.compile)
    steps_per_epoch = len(id_loader)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(
        optimizer, T_max=settings.epochs * steps_per_epoch, eta_min=settings.lr_min
    )

    # 3. Resume: checkpoints are resumed only by the same work (same settings, same input files);
    #    the epoch count is checked against theirs in `resume`.
    key = work_key(
        {
            "benchmark": params.benchmark,
            "seed": params.seed,
            "classifier": {k: v for k, v in settings.model_dump().items() if k not in ("epochs", "keep_checkpoints")},
        },
        {
            "id_train": id_folder,
            **({"outliers": layout.synthetic_images} if settings.outliers == "ncis" else {}),
            **({"init": init_folder(settings.init, layout)} if settings.init else {}),
        },
    )
    # Rank 0 claims the folder (discarding other work) before the other ranks read it.
    for turn in (True, False):
        if distributed.is_main() == turn:
            done, stats = resume(checkpoint_folder, key, settings.epochs, model, head, optimizer, scheduler, device, epochs_key)
        distributed.barrier()

    # 4. Train, one checkpoint per epoch
    for epoch in range(done + 1, settings.epochs + 1):
        # Every epoch's randomness (order, augmentation, dropout) derives from (seed, epoch) alone,
        # so a resumed run draws exactly what an uninterrupted one would have.
        epoch_seed = _epoch_seed(params.seed, epoch)
        seed_everything(epoch_seed)
        id_generator.manual_seed(epoch_seed)
        outlier_generator.manual_seed(epoch_seed + 1)
        for sampler_ in (id_sampler, outlier_sampler):
            if sampler_ is not None:
                sampler_.set_epoch(epoch_seed)
        stats = train_epoch(trained, head, optimizer, scheduler, id_loader, outlier_loader, settings, device, epoch)
        print(_summary(epoch, settings.epochs, stats))
        tracking.log_metrics(stats, step=epoch)
        if not distributed.is_main():
            continue  # rank 0 saves: every rank holds the same weights after each step
        save_checkpoint(
            checkpoint_folder,
            epoch,
            model,
            head,
            optimizer,
            scheduler,
            {
                "work_key": key,
                "epochs": settings.epochs,
                "steps_per_epoch": steps_per_epoch,
                "stats": stats,
                "rng": {"scheme": "reseeded at the start of every epoch from (seed, epoch)", "seed": params.seed},
            },
            keep=settings.keep_checkpoints,
        )

    # 5. Save (rank 0)
    distributed.barrier()
    if not distributed.is_main():
        return {}
    config = {
        **folder_config(settings.arch, benchmark, mean, std),
        "outliers": settings.outliers,
        "energy_head": None if outliers is None else head_config(head, settings),
        "epochs": settings.epochs,
        "train_stats": stats,
    }
    save_weights(output, model, config)
    tracking.log_artifact(output)
    if not log_model:  # phase 1: the pipeline registers the classifier it evaluates, never this one
        return config
    eval_images = open_images(layout.id_train, eval_transform(benchmark), "prepare")
    examples = torch.stack([eval_images[i][0] for i in range(min(2, len(eval_images)))])
    tracking.log_classifier_model(model.eval(), examples, folder=output)  # model normalises itself: it takes [0, 1] images
    return config
