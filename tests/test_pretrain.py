"""pretrain-classifier (phase 1 of imagenet100's classifier): a cheap no-op where no phase 1 is
configured; the two phases end to end: tests/test_paper_path.py (imagenet100)."""

from __future__ import annotations

import json

from ncis.config import load_params
from ncis.layout import layout_for
from ncis.pipeline import STAGES


def test_pretrain_comes_just_before_train_classifier():
    names = list(STAGES)
    assert names.index("pretrain-classifier") + 1 == names.index("train-classifier")


def test_no_phase_one_writes_only_a_skip_note_and_reads_nothing(tmp_path):
    """digits and cifar100 (pretrain.epochs 0): no data, no model, no training; DVC's outputs exist."""
    from ncis.pretrain_classifier import main

    params = load_params(overrides=[f"outputs={tmp_path / 'outputs'}", "tracking.enabled=false"])
    assert params.pretrain.epochs == 0
    main(params)  # outputs/data does not exist: nothing is read
    layout = layout_for(params)
    assert [p.name for p in layout.pretrained_classifier.iterdir()] == ["skipped.json"]
    assert json.loads((layout.pretrained_classifier / "skipped.json").read_text())["pretrained"] is False
    assert list(layout.pretrained_classifier_checkpoints.iterdir()) == []
    before = (layout.pretrained_classifier / "skipped.json").read_bytes()
    main(params)  # a rerun writes the same bytes, so DVC's train-classifier dep on it never changes
    assert (layout.pretrained_classifier / "skipped.json").read_bytes() == before


def test_phase_one_trains_with_cross_entropy_alone_from_the_classifier_section():
    from ncis.pretrain_classifier import phase_one

    params = load_params("configs/imagenet100.yaml")
    settings = phase_one(params)
    assert (settings.outliers, settings.init, settings.epochs, settings.batch_size) == ("none", "", 100, 160)
    kept = ("arch", "lr", "lr_min", "momentum", "weight_decay", "augment", "precision", "num_workers")
    assert all(getattr(settings, key) == getattr(params.classifier, key) for key in kept)
    # phase 2's energy-head keys do not reach phase 1 (its work key, hence its resume)
    other = load_params("configs/imagenet100.yaml", ["classifier.energy_weight=0.5", "classifier.energy_head=free"])
    assert phase_one(other) == settings
