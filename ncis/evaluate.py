"""evaluate: ID accuracy and FPR95 / AUROC / AUPR of the trained classifier against every OOD test set.

Writes metrics.json (the form docs/contract.md fixes, plus group and validation averages), logs the
same numbers to MLflow, prints a table and draws score histograms and ROC curves. A benchmark
with validation OOD sets (digits) also gets them scored against the same ID test images, in
metrics.json's "validation" block and MLflow's `<metric>/val_<set>`: the numbers to choose
settings on, so that the test sets are only ever reported.

Under `evaluate.protocol: openood_v1.5` it scores OpenOOD v1.5's CIFAR-100 lists instead (ncis/openood.py)
and writes metrics_openood_v1.5.json and openood_v1.5.csv, leaving metrics.json and the plots alone.
"""

from __future__ import annotations

import dataclasses
import math
import zlib
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure  # the object API needs no pyplot and no GUI backend
from sklearn.metrics import roc_curve
from torch.utils.data import Subset

from ncis import openood, tracking
from ncis.classifiers import eval_transform, load_classifier, make_loader, open_images
from ncis.datasets import get_benchmark
from ncis.errors import UserError
from ncis.io import atomic_path, write_json
from ncis.layout import layout_for
from ncis.metrics import METRIC_NAMES, accuracy, average, ood_metrics
from ncis.runtime import resolve_device, seed_everything
from ncis.scores import make_scorer, score_loader


def _check_compatible(config: dict, benchmark, folder: Path) -> None:
    expected = {"num_classes": benchmark.num_classes, "channels": benchmark.channels, "image_size": benchmark.image_size}
    found = {key: config.get(key) for key in expected}
    if found != expected:
        raise UserError(
            f"{folder} was trained for {found}, benchmark {benchmark.name!r} needs {expected}; "
            "run `ncis train-classifier` for this benchmark first"
        )


def ood_subset(num_images: int, id_count: int, fraction: float, seed: int, name: str) -> np.ndarray | None:
    """Indices of the OOD images to score: a seeded random floor(fraction x ID test size) of them, as the paper
    scores len(ID test) // 5 per set (LarsDoorenbos/NCIS scripts/test_ood_cifar100.py:98, 113-114, 148);
    None (all) when fraction is 0 or the set is no larger. Each set draws from its own seed, so adding a
    set leaves the others' subsets as they were."""
    size = max(1, math.floor(fraction * id_count + 1e-9))
    if fraction == 0 or size >= num_images:
        return None
    rng = np.random.default_rng([seed, zlib.crc32(name.encode())])
    return np.sort(rng.choice(num_images, size, replace=False))


def _scores(model, scorer, folder: Path, transform, batch_size: int, device, what: str, subset=None) -> dict[str, np.ndarray]:
    images = open_images(folder, transform, "prepare")
    if subset is not None:
        images = Subset(images, subset.tolist())
    return _finite(score_loader(model, scorer, make_loader(images, batch_size, device), device), f"{what} ({folder})")


def _finite(result: dict[str, np.ndarray], what: str) -> dict[str, np.ndarray]:
    if not np.isfinite(result["scores"]).all():
        raise UserError(f"the classifier gives non-finite scores on {what}; retrain it (lower classifier.lr)")
    return result


def build_metrics(benchmark, score: str, id_accuracy: float, id_scores: np.ndarray, ood_scores: dict) -> dict:
    ood = {name: {"group": benchmark.ood_sets[name], **ood_metrics(id_scores, scores)} for name, scores in ood_scores.items()}
    groups = list(dict.fromkeys(entry["group"] for entry in ood.values()))  # first-seen order: near before far
    return {
        "benchmark": benchmark.name,
        "score": score,
        "id_accuracy": id_accuracy,
        "ood": ood,
        "average": average(ood.values()),
        "groups": {group: average(e for e in ood.values() if e["group"] == group) for group in groups},
    }


def validation_block(benchmark, id_scores: np.ndarray, validation_scores: dict) -> dict:
    """metrics.json's "validation": per set, average and per group, as for the test sets."""
    as_test = build_metrics(dataclasses.replace(benchmark, ood_sets=benchmark.validation_ood_sets), "", 0.0, id_scores, validation_scores)
    return {key: as_test[key] for key in ("ood", "average", "groups")}


def format_table(metrics: dict, title: str | None = None) -> str:
    header = f"{'OOD set':<14}{'group':<7}" + "".join(f"{h:>10}" for h in ("FPR95", "AUROC", "AUPR-In", "AUPR-Out"))

    def row(label: str, group: str, entry: dict) -> str:
        return f"{label:<14}{group:<7}" + "".join(f"{100 * entry[m]:>10.2f}" for m in METRIC_NAMES)

    lines = [
        title or f"{metrics['benchmark']}: score {metrics['score']}, ID accuracy {100 * metrics['id_accuracy']:.2f}% (metrics in %)",
        header,
        "-" * len(header),
        *(row(name, entry["group"], entry) for name, entry in metrics["ood"].items()),
        "-" * len(header),
        *(row(f"{group} average", "", entry) for group, entry in metrics["groups"].items()),
        row("average", "", metrics["average"]),
    ]
    return "\n".join(lines)


def write_plots(folder: Path, score: str, id_scores: np.ndarray, ood_scores: dict[str, np.ndarray], metrics: dict) -> None:
    """One histogram per OOD set (ID vs that set) and one figure of all ROC curves."""
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        for name, scores in ood_scores.items():
            figure = Figure(figsize=(5, 3.5), layout="constrained")
            axes = figure.subplots()
            bins = np.histogram_bin_edges(np.concatenate([id_scores, scores]), bins=50)
            axes.hist(id_scores, bins=bins, alpha=0.6, density=True, label="ID test")
            axes.hist(scores, bins=bins, alpha=0.6, density=True, label=name)
            entry = metrics["ood"][name]
            axes.set_title(f"{name}: AUROC {entry['auroc']:.3f}, FPR95 {entry['fpr95']:.3f}")
            axes.set_xlabel(f"{score} score (higher = more ID)")
            axes.set_ylabel("density")
            axes.legend()
            figure.savefig(tmp / f"scores_{name}.png", dpi=100)

        figure = Figure(figsize=(5, 5), layout="constrained")
        axes = figure.subplots()
        rows = ["set,fpr,tpr"]  # the same curves as data, for `dvc plots`
        for name, scores in ood_scores.items():
            labels = np.concatenate([np.ones(len(id_scores)), np.zeros(len(scores))])
            fpr, tpr, _ = roc_curve(labels, np.concatenate([id_scores, scores]))
            axes.plot(fpr, tpr, label=f"{name} (AUROC {metrics['ood'][name]['auroc']:.3f})")
            rows += [f"{name},{f:.6g},{t:.6g}" for f, t in zip(fpr, tpr)]
        (tmp / "roc.csv").write_text("\n".join(rows) + "\n")
        axes.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
        axes.axhline(0.95, color="grey", linestyle="--", linewidth=1)
        axes.set_xlabel("false positive rate (OOD accepted)")
        axes.set_ylabel("true positive rate (ID accepted)")
        axes.set_title(f"ROC, {score} score")
        axes.legend(loc="lower right")
        figure.savefig(tmp / "roc.png", dpi=100)


def _main_openood(params, layout, model, device) -> dict:
    """OpenOOD v1.5's CIFAR-100 benchmark: its lists, every image of each (no ood_fraction), its metrics."""
    settings = params.evaluate
    root = Path(settings.openood_root)
    scorer = make_scorer(settings)
    # 1. Every list and every image it names must exist before the (possibly long) scoring starts.
    names = [openood.ID_TEST, *(name for _, name in openood.OOD_SETS.values()), openood.ID_VAL, *openood.VALIDATION_OOD.values()]
    if scorer.needs_fit:  # fitted on OpenOOD's ID training list, as its postprocessors' setup (OpenOOD evaluator.py:126)
        names.insert(0, openood.ID_TRAIN)
    lists = {name: openood.ImageList(root, name, openood.transform()) for name in names}

    def scores(name: str) -> dict[str, np.ndarray]:
        return _finite(score_loader(model, scorer, make_loader(lists[name], settings.batch_size, device), device), str(lists[name].list))

    # 2. Fit the scorer if it needs it, then score the test lists and the validation pair.
    if scorer.needs_fit:
        scorer.fit(model, make_loader(lists[openood.ID_TRAIN], settings.batch_size, device), device)
    id_result = scores(openood.ID_TEST)
    ood_scores = {name: scores(file)["scores"] for name, (_, file) in openood.OOD_SETS.items()}
    validation = {"id": scores(openood.ID_VAL)["scores"], "ood": {name: scores(file)["scores"] for name, file in openood.VALIDATION_OOD.items()}}
    sizes = {name.removesuffix(".txt"): len(images) for name, images in lists.items()}

    # 3. Report: JSON, OpenOOD's CSV, MLflow (names prefixed, so no paper-protocol metric changes meaning).
    report = openood.build_report(settings.score, accuracy(id_result["logits"], id_result["labels"]), id_result["scores"], ood_scores, sizes, validation)
    write_json(layout.openood_metrics, report)
    openood.write_csv(layout.openood_csv, report)
    tracking.log_summary({f"{openood.NAME}/{name}": value for name, value in tracking.evaluation_metrics(report).items()})
    print(openood.format_table(report))
    tracking.log_artifact(layout.openood_metrics)
    tracking.log_artifact(layout.openood_csv)
    return report


def main(params) -> dict:
    layout = layout_for(params)
    benchmark = get_benchmark(params.benchmark)
    settings = params.evaluate
    seed_everything(params.seed)
    device = resolve_device(params.device)

    model, config = load_classifier(layout.classifier)
    _check_compatible(config, benchmark, layout.classifier)
    model.to(device).eval()
    tracking.set_tags({"protocol": settings.protocol})  # one run per protocol, told apart in the MLflow UI
    if settings.protocol == openood.NAME:
        return _main_openood(params, layout, model, device)
    transform = eval_transform(benchmark)
    # Check every input exists before the (possibly long) scoring starts.
    folders = {"ID test": layout.id_test, **{name: layout.ood(name) for name in benchmark.ood_sets}}
    folders.update({f"validation {name}": layout.ood_val(name) for name in benchmark.validation_ood_sets})
    for folder in folders.values():
        open_images(folder, None, "prepare")

    scorer = make_scorer(settings)
    if scorer.needs_fit:
        train = open_images(layout.id_train, transform, "prepare")
        scorer.fit(model, make_loader(train, settings.batch_size, device), device)
    id_result = _scores(model, scorer, layout.id_test, transform, settings.batch_size, device, "the ID test set")
    ood_scores = {}
    for name in benchmark.ood_sets:
        count = len(open_images(layout.ood(name), None, "prepare"))
        subset = ood_subset(count, len(id_result["scores"]), settings.ood_fraction, params.seed, name)
        what = f"OOD set {name!r}"
        ood_scores[name] = _scores(model, scorer, layout.ood(name), transform, settings.batch_size, device, what, subset)["scores"]
    validation_scores = {}
    for name in benchmark.validation_ood_sets:
        count = len(open_images(layout.ood_val(name), None, "prepare"))
        subset = ood_subset(count, len(id_result["scores"]), settings.ood_fraction, params.seed, f"validation/{name}")
        what = f"validation OOD set {name!r}"
        validation_scores[name] = _scores(model, scorer, layout.ood_val(name), transform, settings.batch_size, device, what, subset)["scores"]
    id_accuracy = accuracy(id_result["logits"], id_result["labels"])
    metrics = build_metrics(benchmark, settings.score, id_accuracy, id_result["scores"], ood_scores)
    if validation_scores:
        metrics["validation"] = validation_block(benchmark, id_result["scores"], validation_scores)

    write_json(layout.metrics, metrics)
    tracking.log_evaluation(metrics)  # also on the pipeline run; names: tracking.evaluation_metrics
    print(format_table(metrics))
    if validation_scores:
        print("\n" + format_table({**metrics, **metrics["validation"]}, "validation OOD sets (for choosing settings; against the same ID test images)"))
    write_plots(layout.plots, settings.score, id_result["scores"], ood_scores, metrics)
    tracking.log_artifact(layout.metrics)
    tracking.log_artifact(layout.plots)
    return metrics
