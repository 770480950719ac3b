"""metrics.json recomputed from what the stages saved, without ncis's scores or metrics: the check
the end-to-end runs share (digits in test_pipeline, CIFAR-100 and ImageNet-100 in test_paper_path)."""

from __future__ import annotations

import math
import zlib
from pathlib import Path

import numpy as np
import pytest

METRICS = ("fpr95", "auroc", "aupr_in", "aupr_out")  # docs/contract.md


def paper_subset(count: int, id_count: int, fraction: float, seed: int, name: str) -> np.ndarray:
    """The OOD images evaluate scores, by the documented rule: a random floor(fraction x ID test size)
    of them, drawn by numpy from (seed, crc32 of the set's name), sorted; all when 0 or not fewer."""
    size = max(1, math.floor(fraction * id_count + 1e-9))
    if fraction == 0 or size >= count:
        return np.arange(count)
    return np.sort(np.random.default_rng([seed, zlib.crc32(name.encode())]).choice(count, size, replace=False))


def recomputed_metrics(outputs: Path, benchmark_name: str, batch_size: int, ood_fraction: float = 0.0, seed: int = 0) -> dict:
    """metrics.json's numbers recomputed from the saved classifier and data: energy = logsumexp of
    the logits (higher = more ID), metrics from scikit-learn; only the seeded OOD subset is scored."""
    import torch
    from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

    from ncis.classifiers import load_classifier
    from ncis.datasets import get_benchmark, load_images

    benchmark = get_benchmark(benchmark_name)
    model, _ = load_classifier(outputs / "classifier")
    model.eval()

    def logits(folder: Path, subset_name: str | None = None, id_count: int = 0) -> tuple[np.ndarray, np.ndarray]:
        images, labels = load_images(folder, channels=benchmark.channels)  # stored at the benchmark's size
        assert images.shape[1:3] == (benchmark.image_size,) * 2, folder
        if subset_name is not None:
            picked = paper_subset(len(images), id_count, ood_fraction, seed, subset_name)
            images, labels = images[picked], labels[picked]
        # Stacked [C, H, W] tensors in ncis's batches, as a DataLoader batches them: the same memory
        # layout, so the same convolution kernels and the very same floats as ncis's scores.
        pixels = torch.stack([torch.from_numpy(image).permute(2, 0, 1).contiguous().float().div(255) for image in images])
        with torch.no_grad():
            return torch.cat([model(batch) for batch in pixels.split(batch_size)]).numpy(), labels

    def metrics(id_scores: np.ndarray, ood_scores: np.ndarray) -> dict:
        labels = np.r_[np.ones(len(id_scores)), np.zeros(len(ood_scores))]
        scores = np.r_[id_scores, ood_scores]
        fpr, tpr, _ = roc_curve(labels, scores, drop_intermediate=False)
        return {
            "fpr95": float(fpr[np.argmax(tpr >= 0.95)]),  # the lowest FPR that keeps 95% of ID accepted
            "auroc": roc_auc_score(labels, scores),
            "aupr_in": average_precision_score(labels, scores),
            "aupr_out": average_precision_score(1 - labels, -scores),
        }

    def energy(values: np.ndarray) -> np.ndarray:
        return torch.logsumexp(torch.from_numpy(values), dim=1).numpy()  # float32, as ncis: its near-ties stay ties

    id_logits, id_labels = logits(outputs / "data" / "test")
    n = len(id_logits)
    ood = {name: metrics(energy(id_logits), energy(logits(outputs / "data" / "ood" / name, name, n)[0])) for name in benchmark.ood_sets}
    validation = {
        name: metrics(energy(id_logits), energy(logits(outputs / "data" / "ood_val" / name, f"validation/{name}", n)[0]))
        for name in benchmark.validation_ood_sets
    }
    return {"id_accuracy": float(np.mean(id_logits.argmax(1) == id_labels)), "ood": ood, "validation": validation}


def mean_of(entries: list[dict]) -> dict:
    return {metric: float(np.mean([entry[metric] for entry in entries])) for metric in METRICS}


def assert_metrics_recompute(outputs: Path, report: dict, benchmark_name: str, batch_size: int, ood_fraction: float = 0.0, seed: int = 0) -> None:
    """Every number in metrics.json, recomputed from what the stages saved."""
    from sklearn.metrics import auc

    from ncis.datasets import get_benchmark

    expected = recomputed_metrics(outputs, benchmark_name, batch_size, ood_fraction, seed)
    benchmark = get_benchmark(benchmark_name)
    assert report["id_accuracy"] == pytest.approx(expected["id_accuracy"], abs=1e-12)
    # The test sets, and the validation sets apart (metrics.json "validation"), each in the same form.
    blocks = [(report, benchmark.ood_sets, expected["ood"])]
    if benchmark.validation_ood_sets:
        blocks.append((report["validation"], benchmark.validation_ood_sets, expected["validation"]))
    else:
        assert "validation" not in report
    for block, sets, recomputed in blocks:
        assert list(block["ood"]) == list(sets)
        for name, entry in block["ood"].items():
            assert entry["group"] == sets[name]
            for metric in METRICS:
                assert entry[metric] == pytest.approx(recomputed[name][metric], abs=1e-6), (name, metric)
        assert block["average"] == pytest.approx(mean_of(list(recomputed.values())), abs=1e-6)
        assert block["groups"] == {
            group: pytest.approx(mean_of([recomputed[name] for name, g in sets.items() if g == group]), abs=1e-6)
            for group in dict.fromkeys(sets.values())
        }
    # The ROC data `dvc plots` shows: each set's curve has that set's AUROC.
    rows = [line.split(",") for line in (outputs / "plots" / "roc.csv").read_text().splitlines()]
    assert rows[0] == ["set", "fpr", "tpr"]
    for name, entry in report["ood"].items():
        fpr, tpr = np.array([[float(f), float(t)] for s, f, t in rows[1:] if s == name]).T
        assert auc(fpr, tpr) == pytest.approx(entry["auroc"], abs=1e-5), name
