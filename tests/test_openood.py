"""evaluate.protocol=openood_v1.5: OpenOOD v1.5's CIFAR-100 lists read from a fake distribution in
OpenOOD's exact layout (<root>/benchmark_imglist/cifar100/*.txt, <root>/images_classic/...), scored
by a tiny untrained classifier; metrics recomputed here by hand, OpenOOD's CSV, one-line errors."""

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import precision_recall_curve, roc_auc_score

from ncis import evaluate, metrics, openood, registry, tracking
from ncis.classifiers import build_classifier
from ncis.cli import main as cli
from ncis.config import load_params
from ncis.errors import UserError
from ncis.io import save_weights
from ncis.layout import layout_for

ROOT = Path(__file__).resolve().parents[1]
CIFAR = str(ROOT / "configs" / "cifar100.yaml")
SIZES = {"train_cifar100": 10, "test_cifar100": 8, "val_cifar100": 5, "val_tin": 5}  # every OOD test list: 6
ROWS = ["cifar10", "tin", "nearood", "mnist", "svhn", "texture", "places365", "farood"]


def write_openood(root, seed=0) -> dict[str, list[str]]:
    """A few images per list in OpenOOD's layout and list format, with the edge cases its lists can hold:
    Windows line endings (ID test), blank and whitespace-padded lines (TIN), a dict extra (texture),
    grey and odd-sized images (resized and centre-cropped to 32). Returns list name -> image paths."""
    rng = np.random.default_rng(seed)
    lists = {name: count for name, count in SIZES.items()}
    lists.update({file.removesuffix(".txt"): 6 for _, file in openood.OOD_SETS.values()})
    written = {}
    for name, count in lists.items():
        folder = name.split("_", 1)[1]  # cifar100, tin, ... as OpenOOD's images_classic/<dataset>/
        paths, lines = [], []
        for i in range(count):
            relative = f"{folder}/{name.split('_')[0]}/{i}.{'jpg' if folder == 'places365' else 'png'}"
            size = (40, 36) if i % 2 else (32, 32)
            if folder == "mnist":
                image = Image.fromarray(rng.integers(0, 256, size[::-1], dtype=np.uint8), "L")
            else:
                image = Image.fromarray(rng.integers(0, 256, (*size[::-1], 3), dtype=np.uint8), "RGB")
            (root / "images_classic" / relative).parent.mkdir(parents=True, exist_ok=True)
            image.save(root / "images_classic" / relative)
            paths.append(root / "images_classic" / relative)
            label = i % 10 if folder == "cifar100" else -1
            lines.append(f"{relative} {{'label': {label}}}" if folder == "texture" else f"{relative} {label}")
        text = "\n".join(lines) + "\n"
        if name == "test_cifar100":
            text = text.replace("\n", "\r\n")
        if name == "test_tin":
            text = text.replace("\n", "  \n", 1) + "\n\n"
        (root / openood.LIST_DIR).mkdir(parents=True, exist_ok=True)
        (root / openood.LIST_DIR / f"{name}.txt").write_text(text, newline="")
        written[name] = paths
    return written


def tiny_setup(tmp_path, score="energy"):
    root = tmp_path / "openood"
    images = write_openood(root)
    overrides = [
        f"outputs={tmp_path / 'out'}", "device=cpu", "tracking.enabled=false", "evaluate.protocol=openood_v1.5",
        f"evaluate.openood_root={root}", f"evaluate.score={score}", "evaluate.batch_size=4", "evaluate.knn_k=3",
    ]
    params = load_params(CIFAR, overrides)
    torch.manual_seed(0)
    model = build_classifier("small_cnn", 100, 3, [0.5, 0.4, 0.3], [0.25, 0.25, 0.25]).eval()
    config = {"arch": "small_cnn", "num_classes": 100, "channels": 3, "image_size": 32, "mean": [0.5, 0.4, 0.3], "std": [0.25] * 3}
    save_weights(layout_for(params).classifier, model, config)
    return params, overrides, model, images


def by_hand(model, paths) -> tuple[np.ndarray, np.ndarray]:
    """Energy scores and logits of `paths` with OpenOOD's preprocessing written out in PIL and numpy."""
    batch = []
    for path in paths:
        image = Image.open(path).convert("RGB")
        w, h = image.size
        short, long = min(w, h), max(w, h)
        new = (32, int(32 * long / short)) if w <= h else (int(32 * long / short), 32)
        array = np.asarray(image.resize(new, Image.BILINEAR), dtype=np.float32) / 255
        top, left = round((array.shape[0] - 32) / 2), round((array.shape[1] - 32) / 2)
        batch.append(array[top : top + 32, left : left + 32].transpose(2, 0, 1))
    with torch.no_grad():
        logits = model(torch.from_numpy(np.stack(batch)))
    return torch.logsumexp(logits, 1).numpy(), logits.numpy()


def fpr95_openood(id_scores, ood_scores) -> float:
    """ID images flagged OOD at the highest threshold that flags 95% of the OOD images (OOD = low score)."""
    needed = math.ceil(0.95 * len(ood_scores))
    threshold = np.sort(ood_scores)[needed - 1]
    return float(np.mean(id_scores <= threshold))


def trapezoid_aupr(labels, scores) -> float:
    precision, recall, _ = precision_recall_curve(labels, scores)
    return float(abs(np.sum((recall[1:] - recall[:-1]) * (precision[1:] + precision[:-1]) / 2)))


def test_read_list_follows_openood_parser(tmp_path):
    path = tmp_path / "list.txt"
    path.write_text("a/0.png 3\r\n\n  \nb/1.png {'label': 7}\nc/2.png -1   \n", newline="")
    assert openood.read_list(path) == [("a/0.png", 3), ("b/1.png", 0), ("c/2.png", -1)]
    for line, fragment in [("a b.png 1", "expected '<path> <label>'"), ("a.png", "expected '<path> <label>'"), ("/abs.png 1", "absolute"), ("a.png 1.5", "neither an int")]:
        path.write_text(line + "\n")
        with pytest.raises(UserError, match=fragment) as err:
            openood.read_list(path)
        assert f"{path}:1" in str(err.value) and "\n" not in str(err.value)


def test_openood_metrics_take_ood_as_positive_where_the_paper_takes_id():
    id_scores = np.array([10.0, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0, -1, -2, -3, -4, -5, -6, -7, -8, -20])
    ood_scores = np.array([-10.0, -11, -12, -13, -14, -15, -16, -17, -18, 9.5])
    ours = openood.metrics(id_scores, ood_scores)
    # OpenOOD: flag 95% of OOD (10 of 10: threshold 9.5) -> 19 of 20 ID flagged; paper: keep 95% of ID
    # (19 of 20: threshold -8) -> 1 of 10 OOD kept.
    assert ours["fpr95"] == pytest.approx(fpr95_openood(id_scores, ood_scores)) == pytest.approx(19 / 20)
    assert metrics.fpr_at_tpr(id_scores, ood_scores) == pytest.approx(1 / 10)
    labels = np.r_[np.ones(20), np.zeros(10)]
    scores = np.r_[id_scores, ood_scores]
    assert ours["auroc"] == pytest.approx(roc_auc_score(labels, scores)) == pytest.approx(metrics.auroc(id_scores, ood_scores))
    assert ours["aupr_in"] == pytest.approx(trapezoid_aupr(labels, scores))
    assert ours["aupr_out"] == pytest.approx(trapezoid_aupr(1 - labels, -scores))
    assert ours["aupr_in"] != pytest.approx(metrics.aupr_in(id_scores, ood_scores))  # trapezoid, not average precision


def test_evaluate_under_openood_matches_metrics_recomputed_by_hand(tmp_path, capsys):
    params, overrides, model, images = tiny_setup(tmp_path)
    layout = layout_for(params)
    layout.metrics.write_text('{"sentinel": 1}')  # the paper protocol's metrics.json stays as it was
    args = ["evaluate", "--params", CIFAR] + [f"--set={o}" for o in overrides if o != "evaluate.protocol=openood_v1.5"]
    assert cli([*args, "--set", "evaluate.protocol=openood_v1.5"]) == 0
    assert layout.metrics.read_text() == '{"sentinel": 1}' and not layout.plots.exists()
    report = json.loads(layout.openood_metrics.read_text())
    assert report["protocol"] == "openood_v1.5" and report["benchmark"] == "cifar100"
    # Every list entry is scored (configs/cifar100.yaml's ood_fraction 0.2 would keep 1 image per set).
    assert report["images"] == {"test_cifar100": 8, **{f.removesuffix(".txt"): 6 for _, f in openood.OOD_SETS.values()}, "val_cifar100": 5, "val_tin": 5}

    id_scores, id_logits = by_hand(model, images["test_cifar100"])
    assert report["id_accuracy"] == pytest.approx(np.mean(id_logits.argmax(1) == np.arange(8) % 10))
    for name, (group, file) in openood.OOD_SETS.items():
        ood_scores, _ = by_hand(model, images[file.removesuffix(".txt")])
        entry = report["ood"][name]
        labels = np.r_[np.ones(8), np.zeros(6)]
        scores = np.r_[id_scores, ood_scores]
        assert entry["group"] == group
        assert entry["auroc"] == pytest.approx(roc_auc_score(labels, scores), abs=1e-6)
        assert entry["fpr95"] == pytest.approx(fpr95_openood(id_scores, ood_scores), abs=1e-6)
        assert entry["aupr_in"] == pytest.approx(trapezoid_aupr(labels, scores), abs=1e-6)
        assert entry["aupr_out"] == pytest.approx(trapezoid_aupr(1 - labels, -scores), abs=1e-6)
    for group, sets in {"near": ["cifar10", "tin"], "far": ["mnist", "svhn", "texture", "places365"]}.items():
        for key in metrics.METRIC_NAMES:
            assert report["groups"][group][key] == pytest.approx(np.mean([report["ood"][s][key] for s in sets]))
    val_id, _ = by_hand(model, images["val_cifar100"])
    val_tin, _ = by_hand(model, images["val_tin"])
    assert report["validation"]["ood"]["tin"]["auroc"] == pytest.approx(roc_auc_score(np.r_[np.ones(5), np.zeros(5)], np.r_[val_id, val_tin]), abs=1e-6)

    # OpenOOD's scripts/eval_ood.py --save-csv layout, in percent, ACC on every row.
    with open(layout.openood_csv, encoding="utf-8", newline="") as handle:
        table = list(csv.reader(handle))
    assert table[0] == ["", "FPR@95", "AUROC", "AUPR_IN", "AUPR_OUT", "ACC"]
    assert [row[0] for row in table[1:]] == ROWS
    for row in table[1:]:
        entry = report["groups"]["near" if row[0] == "nearood" else "far"] if row[0].endswith("ood") else report["ood"][row[0]]
        expected = [100 * entry[k] for k in metrics.METRIC_NAMES] + [100 * report["id_accuracy"]]
        assert row[1:] == [f"{v:.2f} \u00b1 0.00" for v in expected]
    assert "nearood" in capsys.readouterr().out


@pytest.mark.parametrize("score", list(registry.SCORES))
def test_every_score_runs_under_openood(tmp_path, monkeypatch, score):
    params, _, _, _ = tiny_setup(tmp_path, score)
    logged, tags = {}, {}
    monkeypatch.setattr(tracking, "log_summary", logged.update)
    monkeypatch.setattr(tracking, "set_tags", tags.update)
    report = evaluate.main(params)
    values = [entry[k] for entry in [*report["ood"].values(), *report["groups"].values()] for k in metrics.METRIC_NAMES]
    assert len(values) == 8 * 4 and all(0 <= v <= 1 for v in values)
    # Its own MLflow names: no paper-protocol metric (auroc/average, ...) is logged by this run.
    assert tags == {"protocol": "openood_v1.5"}
    assert {"openood_v1.5/auroc/cifar10", "openood_v1.5/fpr95/average_far", "openood_v1.5/id_accuracy", "openood_v1.5/auroc/val_tin"} <= set(logged)
    assert all(name.startswith("openood_v1.5/") for name in logged)


def _error(capsys, overrides) -> str:
    assert cli(["evaluate", "--params", CIFAR, *(f"--set={o}" for o in overrides)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


def test_missing_root_list_or_image_is_one_line_naming_the_fix(tmp_path, capsys):
    params, overrides, _, images = tiny_setup(tmp_path)
    root = tmp_path / "openood"
    fix = "download.py --contents datasets --datasets cifar-100"
    gone = [o for o in overrides if not o.startswith("evaluate.openood_root")] + [f"evaluate.openood_root={tmp_path / 'nowhere'}"]
    message = _error(capsys, gone)
    assert f"{tmp_path / 'nowhere' / openood.LIST_DIR}/" in message and fix in message
    images["test_svhn"][2].unlink()
    message = _error(capsys, overrides)
    assert str(images["test_svhn"][2]) in message and "test_svhn.txt" in message and fix in message
    (root / openood.LIST_DIR / "test_mnist.txt").unlink()
    message = _error(capsys, overrides)
    assert str(root / openood.LIST_DIR / "test_mnist.txt") in message and fix in message
    assert not layout_for(params).openood_metrics.exists()


@pytest.mark.parametrize("params_file", [None, "configs/imagenet100.yaml"])
def test_openood_is_refused_for_other_benchmarks(params_file):
    with pytest.raises(UserError, match="covers benchmark cifar100 only") as err:
        load_params(params_file, ["evaluate.protocol=openood_v1.5"])
    assert "\n" not in str(err.value)


def test_the_mlflow_run_carries_its_protocol_and_prefixed_names(tmp_path, monkeypatch):
    """A local SQLite store (no server): the evaluate run is named after the protocol, tagged and
    parameterised with it, and holds only openood_v1.5/ metrics and the two files."""
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "cifar100-openood")
    monkeypatch.chdir(tmp_path)  # the store's artifacts go to ./mlruns
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        monkeypatch.delenv(name, raising=False)
    _, overrides, _, _ = tiny_setup(tmp_path)
    assert cli(["evaluate", "--params", CIFAR, *(f"--set={o}" for o in overrides if o != "tracking.enabled=false")]) == 0
    client = MlflowClient()
    (run,) = client.search_runs([client.get_experiment_by_name("cifar100-openood").experiment_id])
    assert "evaluate.protocol=openood_v1.5" in run.info.run_name and run.info.run_name.endswith("/evaluate")
    assert run.data.tags["protocol"] == "openood_v1.5" and run.data.params["evaluate.protocol"] == "openood_v1.5"
    assert "openood_v1.5/auroc/cifar10" in run.data.metrics and "openood_v1.5/id_accuracy" in run.data.metrics
    assert all(name.startswith(("openood_v1.5/", "system/")) for name in run.data.metrics)  # system/: MLflow's system metrics
    assert not run.inputs.dataset_inputs  # no paper-protocol data read: none listed
    assert {a.path for a in client.list_artifacts(run.info.run_id)} >= {"metrics_openood_v1.5.json", "openood_v1.5.csv"}
