"""pretrain-classifier: phase 1 of a two-phase classifier, cross-entropy on the ID images alone.

The paper's ImageNet-100 classifier fine-tunes, with the energy regulariser, a ResNet-34 trained
with cross-entropy first (LarsDoorenbos/NCIS scripts/train_ood_det_in100.py:208-216 `--load`;
deeplearning-wisc/dream-ood scripts/pretrain_in100.py). This stage trains that start into
`<outputs>/pretrained_classifier` with `pretrain.epochs` and `pretrain.batch_size` and the
classifier section's backbone, optimiser, schedule, augmentation and precision; train-classifier
starts from it with `classifier.init: pretrain-classifier`. Resumes like train-classifier.

`pretrain.epochs: 0` (digits, CIFAR-100: trained from scratch) does nothing but write
`skipped.json`, so the stage's outputs exist for DVC and cost nothing.
"""

from __future__ import annotations

import json

from ncis import distributed
from ncis.config import ClassifierParams
from ncis.io import atomic_path
from ncis.layout import layout_for
from ncis.runtime import resolve_device, single_cpu_thread
from ncis.train_classifier import train


def phase_one(params) -> ClassifierParams:
    """The classifier section phase 1 trains with: no outliers, no init, `pretrain`'s epochs and batch."""
    settings = params.classifier
    return ClassifierParams(
        arch=settings.arch,
        init="",
        outliers="none",
        epochs=params.pretrain.epochs,
        lr=settings.lr,
        lr_min=settings.lr_min,
        momentum=settings.momentum,
        weight_decay=settings.weight_decay,
        batch_size=params.pretrain.batch_size,
        augment=settings.augment,
        keep_checkpoints=settings.keep_checkpoints,
        num_workers=settings.num_workers,
        precision=settings.precision,
        # Without outliers these shape nothing; fixed, so that changing phase 2's energy head
        # neither reruns nor un-resumes phase 1.
        outlier_batch_size=1,
        max_outliers=0,
        energy_weight=0.0,
        energy_head="free",
        energy_head_hidden=1,
    )


def main(params) -> dict:
    layout = layout_for(params)
    if not params.pretrain.epochs:
        skipped = {"pretrained": False, "reason": "pretrain.epochs is 0: train-classifier starts from classifier.init"}
        if not distributed.is_main():
            return skipped
        with atomic_path(layout.pretrained_classifier) as folder:
            folder.mkdir()
            (folder / "skipped.json").write_text(json.dumps(skipped, indent=2) + "\n")
        layout.pretrained_classifier_checkpoints.mkdir(parents=True, exist_ok=True)
        print("pretrain-classifier: pretrain.epochs is 0, nothing to train")
        return skipped
    device = resolve_device(params.device)
    settings = phase_one(params)
    with single_cpu_thread(device, when=settings.arch == "small_cnn"):
        return train(
            params, settings, device, layout.pretrained_classifier, layout.pretrained_classifier_checkpoints,
            epochs_key="pretrain.epochs", log_model=False,
        )
