"""The embedded digits benchmark: its ID split, its OOD sets (test and validation), and what
evaluate and the demo make of them."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from ncis import evaluate, tracking
from ncis.classifiers import build_classifier
from ncis.config import load_params
from ncis.datasets import digits as digits_module
from ncis.datasets import get_benchmark, load_images, write_image_folder
from ncis.datasets.digits import FLIPS, LETTERS, OVERLAY_EXCLUDED, ROTATED_CLASSES, TEST, VALIDATION
from ncis.io import save_weights
from ncis.layout import layout_for

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
import demo  # noqa: E402

OOD_SIZE = 60
BENCHMARK = get_benchmark("digits")
NEAR_DIGIT_SETS = ("rotated", "flipped", "overlaid")
SHAPE_SETS = tuple(name for name, group in BENCHMARK.ood_sets.items() if group != "stats")  # told apart by shape alone
STATS_SETS = tuple(name for name, group in BENCHMARK.ood_sets.items() if group == "stats")  # by a global statistic


def prepare(outputs: Path, *overrides: str):
    params = load_params(overrides=[f"outputs={outputs}", f"data.ood_size={OOD_SIZE}", *overrides])
    layout = layout_for(params)
    BENCHMARK.prepare_data(params, layout)
    return params, layout


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def levels(images: np.ndarray) -> np.ndarray:
    """uint8 [N, 8, 8, 1] -> the optdigits levels 0..16 [N, 8, 8]."""
    return np.round(images[..., 0] / 255 * 16).astype(np.int64)


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    params, layout = prepare(tmp_path_factory.mktemp("digits"))
    train = load_images(layout.id_train, channels=1)
    test = load_images(layout.id_test, channels=1)
    ood = {name: load_images(layout.ood(name), channels=1)[0] for name in BENCHMARK.ood_sets}
    val = {name: load_images(layout.ood_val(name), channels=1)[0] for name in BENCHMARK.validation_ood_sets}
    return params, layout, train, test, ood, val


def id_digits(digits) -> dict:
    _, _, (train_x, train_y), (test_x, test_y), _, _ = digits
    return {"train": (levels(train_x), train_y), "test": (levels(test_x), test_y)}


# --- the ID split ----------------------------------------------------------------------------


def test_digits_images_are_8x8_grayscale_on_the_digits_17_levels(digits):
    _, _, (train_x, _), (test_x, _), ood, val = digits
    allowed = set(np.round(np.arange(17) * 255 / 16).astype(np.uint8).tolist())
    for images in [train_x, test_x, *ood.values(), *val.values()]:
        assert images.dtype == np.uint8 and images.shape[1:] == (8, 8, 1)
        assert set(np.unique(images).tolist()) <= allowed
    assert train_x.min() == 0 and train_x.max() == 255
    assert len(train_x) + len(test_x) == 1797


def test_digits_split_is_stratified_and_covers_every_class(digits):
    params, _, (_, train_y), (_, test_y), _, _ = digits
    train_counts, test_counts = np.bincount(train_y, minlength=10), np.bincount(test_y, minlength=10)
    assert (train_counts > 0).all() and (test_counts > 0).all() and len(train_counts) == len(test_counts) == 10
    expected = (train_counts + test_counts) * params.data.test_fraction
    assert np.abs(test_counts - expected).max() <= 1


def test_digits_train_and_test_share_no_image(digits):
    _, _, (train_x, _), (test_x, _), _, _ = digits
    train_rows = {row.tobytes() for row in train_x.reshape(len(train_x), -1)}
    test_rows = {row.tobytes() for row in test_x.reshape(len(test_x), -1)}
    assert not train_rows & test_rows
    assert len(train_rows) + len(test_rows) == 1797  # the bundled digits hold no duplicates


# --- the OOD sets: layout --------------------------------------------------------------------


def test_digits_has_near_far_and_stats_test_sets_and_the_same_validation_sets(digits):
    _, layout, _, _, ood, val = digits
    assert BENCHMARK.ood_sets == {
        "letters": "near", "rotated": "near", "flipped": "near", "overlaid": "near",
        "photos": "far", "textures": "far", "noise": "far",
        "flat": "stats", "faint": "stats", "bright": "stats", "inverted": "stats", "static": "stats",
    }
    assert BENCHMARK.validation_ood_sets == BENCHMARK.ood_sets
    for images, folder in [*((ood[n], layout.ood(n)) for n in ood), *((val[n], layout.ood_val(n)) for n in val)]:
        assert len(images) == OOD_SIZE
        assert [p.name for p in folder.iterdir()] == ["0"]
    assert layout.ood_val("noise") == layout.data / "ood_val" / "noise"


# --- the near and far sets: nothing but shape tells them from the digits ---------------------------


def intensity_features(images: np.ndarray) -> np.ndarray:
    """Per image: its sorted pixel values (= its histogram) and its local contrast."""
    flat = np.sort(images.reshape(len(images), -1), axis=1).astype(np.float64)
    return np.column_stack([flat, digits_module.local_contrast(images)]) / 16  # levels 0..16 -> 0..1


def intensity_auroc(train: np.ndarray, test: np.ndarray, ood: np.ndarray) -> float:
    """AUROC of a detector fitted on half of `ood` against the training digits, seeing only intensity statistics."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    half = len(ood) // 2
    fit_x = np.concatenate([intensity_features(train), intensity_features(ood[:half])])
    detector = LogisticRegression(max_iter=2000, class_weight="balanced").fit(fit_x, np.r_[np.zeros(len(train)), np.ones(half)])
    scores = detector.decision_function(np.concatenate([intensity_features(test), intensity_features(ood[half:])]))
    return roc_auc_score(np.r_[np.zeros(len(test)), np.ones(len(ood) - half)], scores)


def training_histograms(digits) -> set[bytes]:
    train = id_digits(digits)["train"][0]
    return {np.sort(image.ravel()).tobytes() for image in train}


@pytest.mark.parametrize("split", ["test", "validation"])
def test_every_ood_image_has_exactly_the_pixel_values_of_a_training_digit(digits, split):
    histograms = training_histograms(digits)
    sets = digits[4] if split == "test" else digits[5]
    for name in SHAPE_SETS:
        found = [np.sort(image.ravel()).tobytes() in histograms for image in levels(sets[name])]
        assert all(found), f"{split} {name}: {found.count(False)} images with a histogram no training digit has"
    assert not any(np.sort(image.ravel()).tobytes() in histograms for name in STATS_SETS for image in levels(sets[name]))


@pytest.mark.parametrize("split", ["test", "validation"])
def test_intensity_statistics_do_not_tell_any_ood_set_from_the_digits(digits, split):
    _, _, (train_x, _), (test_x, _), ood, val = digits
    train, test = levels(train_x), levels(test_x)
    for name in SHAPE_SETS:
        images = levels((ood if split == "test" else val)[name])
        # Mean ink, global contrast and local contrast, each within a fraction of the ID's spread.
        for statistic in (lambda x: x.mean((1, 2)), lambda x: x.std((1, 2)), digits_module.local_contrast):
            assert abs(statistic(images).mean() - statistic(test).mean()) < 0.5 * statistic(test).std(), name
        # And a detector that sees only these statistics is near chance (the OOD sets' shapes differ).
        assert intensity_auroc(train, test, images) < 0.7, name


def test_the_old_full_contrast_far_sets_fail_the_intensity_check(digits):
    """The check above has teeth: the far sets as drawn before histogram matching (stretched to
    full contrast and quantized, as the previous generator did) are told apart by intensity alone."""
    _, _, (train_x, _), (test_x, _), _, _ = digits
    rng = np.random.default_rng(0)
    for name in ("photos", "textures", "noise"):
        shapes = digits_module.OOD_GENERATORS[name](rng, OOD_SIZE, TEST, id_digits(digits)["test"])
        low, high = shapes.min((1, 2), keepdims=True), shapes.max((1, 2), keepdims=True)
        old = np.round((shapes - low) / np.maximum(high - low, 1e-12) * 16).astype(np.int64)
        assert intensity_auroc(levels(train_x), levels(test_x), old) > 0.9, name


def test_matching_keeps_the_shape_and_takes_the_reference_values():
    rng = np.random.default_rng(0)
    shape = np.arange(64, dtype=np.float64).reshape(8, 8)  # brightest at the bottom right
    reference = rng.integers(0, 17, (8, 8))
    matched = digits_module.match_histogram(shape, reference, rng)
    assert np.array_equal(np.sort(matched.ravel()), np.sort(reference.ravel()))
    assert np.array_equal(matched.ravel(), np.sort(reference.ravel()))  # rank order kept

    busy = rng.random((8, 8))  # noise: far busier than a digit
    digit = np.zeros((8, 8), np.int64)
    digit[1:7, 3:5] = 16  # a thick "1": little local contrast
    smooth = digits_module.match_local_contrast(busy, digit, rng)
    assert np.array_equal(np.sort(smooth.ravel()), np.sort(digit.ravel()))
    assert digits_module.local_contrast(smooth) < digits_module.local_contrast(digits_module.match_histogram(busy, digit, rng))


@pytest.mark.parametrize("name", SHAPE_SETS)
def test_each_ood_set_is_told_apart_from_id_by_its_shapes(digits, name):
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    _, _, (train_x, _), (test_x, _), ood, _ = digits
    images, half = ood[name], OOD_SIZE // 2
    flat = lambda x: x.reshape(len(x), -1) / 255.0  # noqa: E731
    fit_x = np.concatenate([flat(train_x), flat(images[:half])])
    detector = LogisticRegression(max_iter=2000, class_weight="balanced").fit(fit_x, np.r_[np.zeros(len(train_x)), np.ones(half)])
    scores = detector.decision_function(np.concatenate([flat(test_x), flat(images[half:])]))
    # Far sets are trivially apart; near sets only partly for a linear detector fitted on 30 images
    # (overlays of two digits least: ~0.75), which is what makes them near.
    bar = 0.95 if BENCHMARK.ood_sets[name] == "far" else 0.7
    assert roc_auc_score(np.r_[np.zeros(len(test_x)), np.ones(OOD_SIZE - half)], scores) > bar


def test_digits_letters_are_styled_like_the_digits(digits):
    # Bright strokes on a black background, so that "near" is about shape, not placement.
    _, _, _, _, ood, _ = digits
    letters = ood["letters"].astype(np.float64)
    assert letters[:, :, [0, -1]].mean() < 0.3 * letters.mean()  # outer columns are background


# --- the stats sets: a global statistic tells them from the digits -------------------------------


@pytest.mark.parametrize("split", ["test", "validation"])
def test_every_stats_image_lies_outside_the_training_digits_envelope_and_no_id_digit_does(digits, split):
    _, _, (train_x, _), (test_x, _), ood, val = digits
    envelope = digits_module.digit_envelope(levels(train_x))
    assert envelope.brightest_low >= 12 and envelope.mean_low > 2 and envelope.mean_high < 8  # what digits are
    for name in STATS_SETS:
        assert digits_module.differs_globally(levels((ood if split == "test" else val)[name]), envelope).all(), name
    assert not digits_module.differs_globally(levels(train_x), envelope).any()
    assert digits_module.differs_globally(levels(test_x), envelope).mean() < 0.02  # unseen digits: a few lighter ones


@pytest.mark.parametrize("split", ["test", "validation"])
def test_stats_sets_have_the_pixel_statistics_they_are_designed_to_have(digits, split):
    _, _, _, _, ood, val = digits
    sets = {name: levels((ood if split == "test" else val)[name]) for name in STATS_SETS}
    settings = TEST if split == "test" else VALIDATION
    low, high = sets["flat"].min((1, 2)), sets["flat"].max((1, 2))
    constant = low == high
    assert 0.2 < constant.mean() < 0.8 and set(low[constant]) <= set(settings.flat_levels)  # constant images and ramps
    assert (digits_module.local_contrast(sets["flat"][~constant]) <= 16 / 7 + 0.5).all()  # ramps: no steeper than 0 to 16 across
    faint = sets["faint"]
    assert (faint.max((1, 2)) - faint.min((1, 2)) <= 9).all() and faint.min((1, 2)).max() > 4  # low contrast, some on grey
    bright = sets["bright"]
    assert (bright.min((1, 2)) >= 4).all() and (bright.max((1, 2)) == 16).all()  # ink at full level on a light ground
    assert sets["inverted"].mean() > 16 - 6.8  # digits are dark; negatives light
    static = sets["static"]
    assert (static.max((1, 2)) - static.min((1, 2)) <= 13).all()
    blocks = lambda x, g: (x == np.kron(x[:, ::g, ::g], np.ones((1, g, g), np.int64))).all((1, 2))  # noqa: E731
    if split == "validation":
        assert blocks(static, 2).all()  # its one grain
    else:
        assert 0.2 < blocks(static, 4).mean() < 0.8 and not blocks(static[~blocks(static, 4)], 2).any()  # grains 1 and 4


def test_a_detector_of_global_statistics_alone_tells_every_stats_set_from_the_digits(digits):
    """The stats sets are what the near and far sets are not: the intensity detector above
    (pixel histogram and local contrast) tells each of them apart, in both splits."""
    _, _, (train_x, _), (test_x, _), ood, val = digits
    for sets in (ood, val):
        for name in STATS_SETS:
            assert intensity_auroc(levels(train_x), levels(test_x), levels(sets[name])) > 0.95, name


def test_inverted_digits_are_negatives_of_their_own_splits_digits(digits):
    pools = id_digits(digits)
    envelope = digits_module.digit_envelope(pools["train"][0])
    for split in (TEST, VALIDATION):
        pool = {image.tobytes() for image in pools[split.digits][0]}
        images = digits_module.make_inverted(np.random.default_rng(0), 40, split, pools[split.digits], envelope)
        assert all((16 - image).tobytes() in pool for image in images)


# --- near sets made from digits --------------------------------------------------------------


def test_no_transform_keeps_a_digit_that_would_read_as_a_digit():
    assert 0 not in ROTATED_CLASSES
    assert not {0, 1, 3, 8} & set(FLIPS["upside_down"]) and not {0, 1, 8} & set(FLIPS["mirrored"])
    assert all((1, b) in OVERLAY_EXCLUDED for b in range(2, 10)) and (0, 1) in OVERLAY_EXCLUDED


def test_near_sets_hold_no_id_digit_and_none_nearer_the_digits_than_they_are_to_each_other(digits):
    from sklearn.neighbors import NearestNeighbors

    _, _, (train_x, _), (test_x, _), ood, val = digits
    id_rows = {row.tobytes() for row in np.concatenate([train_x, test_x]).reshape(-1, 64)}
    train = levels(train_x).reshape(len(train_x), -1).astype(np.float64)
    nearest = NearestNeighbors(n_neighbors=1).fit(train)
    median_id = np.median(nearest.kneighbors(levels(test_x).reshape(len(test_x), -1))[0])
    for name in NEAR_DIGIT_SETS:
        for images in (ood[name], val[name]):
            assert not {row.tobytes() for row in images.reshape(-1, 64)} & id_rows, name
            distances = nearest.kneighbors(levels(images).reshape(len(images), -1).astype(np.float64))[0]
            assert np.mean(distances < median_id) <= 0.05, name


@pytest.mark.parametrize("name", NEAR_DIGIT_SETS)
def test_near_sets_transform_the_digits_of_their_own_split(digits, name):
    """Test near sets come from ID test digits only, validation ones from training digits only:
    every shape, transformed back, is a digit of that pool."""
    pools = id_digits(digits)
    assert TEST.digits == "test" and VALIDATION.digits == "train"
    for split in (TEST, VALIDATION):
        pool_images, pool_labels = pools[split.digits]
        pool = {image.tobytes() for image in pool_images.astype(np.float64)}
        shapes = digits_module.OOD_GENERATORS[name](np.random.default_rng(0), 40, split, pools[split.digits])
        for shape in shapes:
            if name == "rotated":
                sources = [np.rot90(shape, -1), np.rot90(shape, 1)]
            elif name == "flipped":
                sources = [shape[::-1, :], shape[:, ::-1]]
            else:  # an overlay is the pixel-wise maximum of two pool digits: each lies under it
                under = [i for i, image in enumerate(pool_images) if (image <= shape).all()]
                assert len(set(pool_labels[under].tolist())) >= 2
                continue
            assert any(np.ascontiguousarray(s).tobytes() in pool for s in sources)


# --- validation against test -----------------------------------------------------------------


def test_validation_and_test_sets_share_no_image_and_no_source(digits):
    _, _, _, _, ood, val = digits
    test_rows = {row.tobytes() for images in ood.values() for row in images.reshape(-1, 64)}
    val_rows = {row.tobytes() for images in val.values() for row in images.reshape(-1, 64)}
    assert not test_rows & val_rows
    assert not set(TEST.letters) & set(VALIDATION.letters) and set(TEST.letters) | set(VALIDATION.letters) == set(LETTERS)
    assert not set(TEST.photos) & set(VALIDATION.photos)
    assert not set(TEST.textures) & set(VALIDATION.textures)
    assert not set(TEST.flat_levels) & set(VALIDATION.flat_levels) and not set(TEST.noise_grains) & set(VALIDATION.noise_grains)
    assert TEST.digits != VALIDATION.digits and TEST.name != VALIDATION.name  # digits and random streams


def test_digits_prepare_is_deterministic_for_a_seed(digits, tmp_path):
    _, layout, _, _, _, _ = digits
    _, again = prepare(tmp_path / "same")
    assert folder_bytes(again.data) == folder_bytes(layout.data)
    _, other = prepare(tmp_path / "other", "seed=1")
    folders = ["train", "test", *(f"ood/{n}" for n in BENCHMARK.ood_sets), *(f"ood_val/{n}" for n in BENCHMARK.validation_ood_sets)]
    for folder in folders:
        assert folder_bytes(other.data / folder) != folder_bytes(layout.data / folder), folder


def test_interrupted_digits_prepare_leaves_no_partial_data(tmp_path, monkeypatch):
    def broken(rng, count, split, digits):
        if split is VALIDATION:
            raise RuntimeError("interrupted")
        return digits_module.make_noise(rng, count, split, digits)

    # Validation `noise` is written last, so everything else is already on disk when it fails.
    monkeypatch.setitem(digits_module.OOD_GENERATORS, "noise", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        prepare(tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither `data` nor a temporary folder

    monkeypatch.undo()
    _, layout = prepare(tmp_path)
    before = folder_bytes(layout.data)
    monkeypatch.setitem(digits_module.OOD_GENERATORS, "noise", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        prepare(tmp_path, "seed=1")
    assert folder_bytes(layout.data) == before
    assert [p.name for p in tmp_path.iterdir()] == ["data"]


# --- evaluate reports the validation sets apart ----------------------------------------------------


def tiny_evaluation(root: Path):
    """ID train/test, test OOD sets of bright noise, validation OOD sets that are copies of the ID test images, an untrained CNN."""
    rng = np.random.default_rng(0)
    params = load_params(overrides=[f"outputs={root}", "device=cpu", "evaluate.batch_size=16", "tracking.enabled=false"])
    layout = layout_for(params)
    labels = np.arange(30) % 10
    write_image_folder(layout.id_train, rng.integers(0, 128, (30, 8, 8, 1), dtype=np.uint8), labels)
    id_test = rng.integers(0, 128, (20, 8, 8, 1), dtype=np.uint8)
    write_image_folder(layout.id_test, id_test, labels[:20])
    for name in BENCHMARK.ood_sets:
        write_image_folder(layout.ood(name), rng.integers(100, 256, (12, 8, 8, 1), dtype=np.uint8), np.zeros(12, int))
    for name in BENCHMARK.validation_ood_sets:
        write_image_folder(layout.ood_val(name), id_test, np.zeros(20, int))
    model = build_classifier("small_cnn", 10, 1, [0.3], [0.2])
    save_weights(layout.classifier, model, {"arch": "small_cnn", "num_classes": 10, "channels": 1, "image_size": 8, "mean": [0.3], "std": [0.2]})
    return params, layout


def test_evaluate_reports_validation_sets_apart_from_the_test_sets(tmp_path, monkeypatch, capsys):
    params, layout = tiny_evaluation(tmp_path)
    logged = {}
    monkeypatch.setattr(tracking.Run, "log_summary", lambda run, metrics: logged.update(metrics))  # the no-op stand-in
    monkeypatch.setattr(evaluate, "write_plots", lambda *args, **kwargs: None)
    returned = evaluate.main(params)
    metrics = json.loads(layout.metrics.read_text())
    assert metrics == returned

    block = metrics["validation"]
    assert set(block) == {"ood", "average", "groups"}
    assert list(block["ood"]) == list(BENCHMARK.validation_ood_sets) and list(block["groups"]) == ["near", "far", "stats"]
    assert block["ood"]["rotated"]["group"] == "near" and block["ood"]["noise"]["group"] == "far"
    # Validation sets that are the ID test images themselves are indistinguishable from them, the
    # bright test noise is not: each block holds its own sets' numbers.
    assert all(entry["auroc"] == pytest.approx(0.5) for entry in block["ood"].values())
    assert all(entry["auroc"] != pytest.approx(0.5) for entry in metrics["ood"].values())
    assert block["average"]["auroc"] == pytest.approx(np.mean([e["auroc"] for e in block["ood"].values()]))

    for name, entry in block["ood"].items():
        assert logged[f"auroc/val_{name}"] == entry["auroc"] and logged[f"fpr95/val_{name}"] == entry["fpr95"]
    assert logged["auroc/val_average"] == block["average"]["auroc"]
    assert logged["fpr95/val_average_near"] == block["groups"]["near"]["fpr95"]
    assert logged["auroc/noise"] == metrics["ood"]["noise"]["auroc"]  # the test sets' names are unchanged
    assert logged["auroc/average"] == metrics["average"]["auroc"]
    assert "validation OOD sets" in capsys.readouterr().out


def test_evaluate_names_a_missing_validation_set(tmp_path):
    params, layout = tiny_evaluation(tmp_path)
    for path in sorted(layout.ood_val("photos").rglob("*"), reverse=True):
        path.unlink() if path.is_file() else path.rmdir()
    layout.ood_val("photos").rmdir()
    with pytest.raises(evaluate.UserError, match="ood_val/photos.*ncis prepare"):
        evaluate.main(params)


# --- the demo's comparison -------------------------------------------------------------------


def fake_metrics(auroc: float, accuracy: float, stats_auroc: float | None = None) -> dict:
    entry = lambda auroc: {"fpr95": 1 - auroc, "auroc": auroc, "aupr_in": auroc, "aupr_out": auroc}  # noqa: E731
    stats = entry(auroc if stats_auroc is None else stats_auroc)
    block = {
        "ood": {name: {"group": group, **(stats if group == "stats" else entry(auroc))} for name, group in BENCHMARK.ood_sets.items()},
        "average": entry(auroc),
        "groups": {"near": entry(auroc), "far": entry(auroc), "stats": stats},
    }
    return {"benchmark": "digits", "score": "energy", "id_accuracy": accuracy, **block, "validation": block}


def test_demo_table_shows_every_set_and_group_with_and_without_outliers_and_marks_each_loss():
    table = demo.comparison_table(fake_metrics(0.9, 0.98, stats_auroc=0.4), fake_metrics(0.6, 0.99))
    rows = {line.split()[0] if not line.startswith("val") else " ".join(line.split()[:2]): line for line in table.splitlines()[4:] if line.strip()}
    # every test set and group, the average, the validation average and groups: none, NCIS, Δ for AUROC then FPR95
    assert set(BENCHMARK.ood_sets) | {"near", "far", "stats", "average", "val average", "val near", "val far", "val stats"} <= set(rows)
    assert rows["letters"].split()[2:8] == ["60.0", "90.0", "+30.0", "40.0", "10.0", "-30.0"]
    assert rows["flat"].split()[2:5] == ["60.0", "40.0", "-20.0"] and rows["flat"].endswith("NCIS loses")
    assert rows["stats"].endswith("NCIS loses") and rows["val stats"].endswith("NCIS loses")
    assert not any(rows[name].endswith("loses") for name in ("letters", "near", "far", "average", "val average"))
    assert "ID accuracy (%): none 99.0, NCIS 98.0" in table


def test_demo_runs_the_pipeline_then_the_same_classifier_without_outliers(tmp_path, monkeypatch, capsys):
    outputs = tmp_path / "outputs"
    calls = []

    def fake_pipeline(params, name):
        calls.append(("pipeline", params.classifier.outliers, params.outputs))
        (outputs / "data").mkdir(parents=True)
        layout_for(params).metrics.write_text(json.dumps(fake_metrics(0.9, 0.98)))

    def fake_stage(name):
        def run(params):
            calls.append((name, params.classifier.outliers, params.outputs))
            assert (Path(params.outputs) / "data").resolve() == (outputs / "data").resolve()
            if name == "evaluate":
                layout_for(params).metrics.write_text(json.dumps(fake_metrics(0.6, 0.99)))
        return run

    logged = {}
    monkeypatch.setattr(demo, "run_pipeline", fake_pipeline)
    monkeypatch.setattr(demo, "stage_function", fake_stage)
    monkeypatch.setattr(tracking, "log_metrics", lambda metrics, step=None: logged.update(metrics))
    assert demo.main([f"--set=outputs={outputs}", "--no-tracking"]) == 0

    baseline = str(outputs / "baseline")
    assert calls == [("pipeline", "ncis", str(outputs)), ("train-classifier", "none", baseline), ("evaluate", "none", baseline)]
    out = capsys.readouterr().out
    assert "none" in out and "NCIS" in out
    assert (outputs / "comparison.txt").read_text().strip() == out.strip()
    assert logged["ncis/auroc/letters"] == 0.9 and logged["no_outliers/auroc/letters"] == 0.6
    assert logged["ncis/auroc/val_average"] == 0.9 and logged["no_outliers/id_accuracy"] == 0.99


def test_demo_refuses_a_pipeline_without_outliers(tmp_path, capsys):
    assert demo.main([f"--set=outputs={tmp_path}", "--set=classifier.outliers=none", "--no-tracking"]) == 2
    assert "classifier.outliers is none" in capsys.readouterr().err
