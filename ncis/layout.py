"""Where every stage output lives under the outputs folder (one place, so no stage hard-codes a path)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Layout:
    root: Path

    # prepare
    @property
    def data(self) -> Path:
        return self.root / "data"

    @property
    def id_train(self) -> Path:
        return self.data / "train"

    @property
    def id_train_originals(self) -> Path:
        """The original training files, same classes and order as `id_train` (benchmarks with `keeps_originals`)."""
        return self.data / "train_originals"

    @property
    def id_test(self) -> Path:
        return self.data / "test"

    def ood(self, name: str) -> Path:
        return self.data / "ood" / name

    def ood_val(self, name: str) -> Path:
        """A validation OOD set (`Benchmark.validation_ood_sets`): for choosing settings, never for reporting."""
        return self.data / "ood_val" / name

    @property
    def tiny_diffusion(self) -> Path:
        return self.root / "diffusion"

    @property
    def diffusion_checkpoints(self) -> Path:
        """Resume state of a stopped tiny-model training (removed once `diffusion` is written)."""
        return self.root / "diffusion_checkpoints"

    # embed
    @property
    def embed_dir(self) -> Path:
        return self.root / "embed"

    @property
    def embeddings(self) -> Path:
        return self.embed_dir / "embeddings.npz"

    # train-cvpn
    @property
    def cvpn(self) -> Path:
        return self.root / "cvpn"

    @property
    def cvpn_checkpoints(self) -> Path:
        """Resume state of a stopped train-cvpn (removed once `cvpn` is written)."""
        return self.root / "cvpn_checkpoints"

    # sample
    @property
    def outliers(self) -> Path:
        return self.root / "sample" / "outliers.npz"

    # synthesize
    @property
    def synth_dir(self) -> Path:
        return self.root / "synthesize"

    @property
    def synthetic_images(self) -> Path:
        return self.synth_dir / "images"

    @property
    def preview(self) -> Path:
        return self.synth_dir / "preview.png"

    @property
    def synthesize_batches(self) -> Path:
        """Rendered batches of a stopped synthesize, resumed by a rerun (removed once the images are written)."""
        return self.root / "synthesize_batches"

    # pretrain-classifier
    @property
    def pretrained_classifier(self) -> Path:
        """Phase 1's classifier (cross-entropy alone); with `pretrain.epochs: 0` only `skipped.json`."""
        return self.root / "pretrained_classifier"

    @property
    def pretrained_classifier_checkpoints(self) -> Path:
        return self.root / "pretrained_classifier_checkpoints"

    # train-classifier
    @property
    def classifier(self) -> Path:
        return self.root / "classifier"

    @property
    def classifier_checkpoints(self) -> Path:
        return self.root / "classifier_checkpoints"

    # evaluate
    @property
    def metrics(self) -> Path:
        return self.root / "metrics.json"

    @property
    def plots(self) -> Path:
        return self.root / "plots"

    # evaluate under evaluate.protocol=openood_v1.5 (metrics.json and plots stay the paper protocol's)
    @property
    def openood_metrics(self) -> Path:
        return self.root / "metrics_openood_v1.5.json"

    @property
    def openood_csv(self) -> Path:
        """The table in the layout of OpenOOD's `scripts/eval_ood.py --save-csv`."""
        return self.root / "openood_v1.5.csv"


def layout_for(params) -> Layout:
    return Layout(Path(params.outputs))
