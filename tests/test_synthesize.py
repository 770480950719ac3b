"""Stage `synthesize`: outlier images from outlier embeddings, preview grid, diagnostics."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from ncis import synthesize
from ncis.config import load_params
from ncis.datasets import get_benchmark, load_images, write_image_folder
from ncis.diffusion import load_pipeline, tokenize_prompts, token_embedding_table
from ncis.errors import UserError
from ncis.io import load_arrays, save_arrays
from ncis.layout import layout_for

from faults import digests


def _fake_run(tmp_path, model_dir, outliers_per_class=3, *more):
    params = load_params(
        overrides=[
            f"outputs={tmp_path}",
            f"diffusion.model={model_dir}",
            "tracking.enabled=false",
            "synthesize.steps=4",
            "synthesize.batch_size=7",
            "synthesize.control_per_class=2",
            "synthesize.preview_per_class=2",
            *more,
        ]
    )
    layout = layout_for(params)
    rng = np.random.default_rng(0)
    write_image_folder(layout.id_train, rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8), np.arange(40) % 10)
    dim = 16
    labels = np.arange(40) % 10
    save_arrays(layout.embeddings, embeddings=rng.normal(size=(40, dim)).astype(np.float32), labels=labels)
    save_arrays(layout.outliers, outliers=rng.normal(size=(10, outliers_per_class, dim)).astype(np.float32), labels=np.arange(10))
    return params, layout


def test_synthesize_writes_an_image_folder_preview_and_diagnostics(tmp_path, untrained_pipeline_dir):
    params, layout = _fake_run(tmp_path, untrained_pipeline_dir)
    report = synthesize.main(params)
    images, labels = load_images(layout.synthetic_images)
    assert images.shape == (30, 8, 8, 1) and np.bincount(labels).tolist() == [3] * 10
    assert sorted(p.name for p in (layout.synthetic_images / "9").iterdir()) == ["0.png", "1.png", "2.png"]
    assert Image.open(layout.preview).size[0] > 4 * 32  # 2 real + 2 generated cells per row
    saved = json.loads((layout.synth_dir / "diagnostics.json").read_text())
    assert saved == pytest.approx(report, nan_ok=True)
    assert saved["images"] == 30

    # The outlier diagnostics, recomputed from the files written (PNGs, embeddings.npz, outliers.npz).
    id_images, id_labels = load_images(layout.id_train)
    pixels = lambda x: x.reshape(len(x), -1).astype(np.float64)  # noqa: E731
    classifier = make_pipeline(StandardScaler(), LogisticRegression(max_iter=2000, random_state=params.seed))
    predicted = classifier.fit(pixels(id_images), id_labels).predict(pixels(images))
    assert saved["outlier_in_class_fraction"] == pytest.approx(np.mean(predicted == labels), abs=1e-12)
    per_class = []
    for c in range(10):
        x = pixels(images[labels == c]) / 255
        distances = np.sqrt(((x[:, None] - x[None]) ** 2).sum(-1))
        per_class.append(distances[np.triu_indices(len(x), 1)].mean())
    assert saved["outlier_diversity"] == pytest.approx(np.mean(per_class), rel=1e-9)
    embedded, pool = load_arrays(layout.embeddings), load_arrays(layout.outliers)["outliers"]
    ratios = []
    for c in range(10):
        members = embedded["embeddings"][embedded["labels"] == c].astype(np.float64)
        precision = np.linalg.inv(np.cov(members.T) + 1e-5 * np.eye(members.shape[1]))
        distance = lambda x: np.sqrt(np.einsum("nd,de,ne->n", x - members.mean(0), precision, x - members.mean(0)))  # noqa: E731
        ratios.append(distance(pool[c].astype(np.float64)).mean() / distance(members).mean())
    assert saved["outlier_mahalanobis_ratio"] == pytest.approx(np.mean(ratios), rel=1e-6)
    # The pool's global statistics against the ID images': how well the mean level alone tells them apart.
    from sklearn.metrics import roc_auc_score

    levels = np.r_[pixels(id_images).mean(1), pixels(images).mean(1)]
    auroc = roc_auc_score(np.r_[np.zeros(len(id_images)), np.ones(len(images))], levels)
    assert saved["outlier_mean_level_auroc"] == pytest.approx(auroc, abs=1e-12)
    assert 0 < saved["outlier_local_contrast_ratio"] and 0 <= saved["control_mean_level_auroc"] <= 1


def test_images_per_class_and_save_size(tmp_path, untrained_pipeline_dir):
    params, layout = _fake_run(tmp_path, untrained_pipeline_dir, 2, "synthesize.images_per_class=3", "synthesize.save_size=12")
    synthesize.main(params)
    images, labels = load_images(layout.synthetic_images)
    assert images.shape == (30, 12, 12, 1)


def test_synthesize_is_seeded(tmp_path, untrained_pipeline_dir):
    params, layout = _fake_run(tmp_path / "a", untrained_pipeline_dir)
    synthesize.main(params)
    again, _ = _fake_run(tmp_path / "b", untrained_pipeline_dir)
    synthesize.main(again)
    assert np.array_equal(load_images(layout.synthetic_images)[0], load_images(layout_for(again).synthetic_images)[0])


def test_a_stopped_run_resumes_its_rendered_batches_to_the_same_images(tmp_path, untrained_pipeline_dir, monkeypatch, capsys):
    params, layout = _fake_run(tmp_path / "straight", untrained_pipeline_dir)
    synthesize.main(params)
    stopped, stopped_layout = _fake_run(tmp_path / "stopped", untrained_pipeline_dir)
    real_generate, calls = synthesize.generate, []

    def stop_in_batch_3(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_generate(*args, **kwargs)

    monkeypatch.setattr(synthesize, "generate", stop_in_batch_3)
    with pytest.raises(KeyboardInterrupt):
        synthesize.main(stopped)
    assert not stopped_layout.synth_dir.exists()
    batches = stopped_layout.synthesize_batches
    assert sorted(p.name for p in batches.iterdir()) == ["outliers-00000000.npz", "outliers-00000007.npz", "work-key.txt"]

    monkeypatch.setattr(synthesize, "generate", lambda *args, **kwargs: calls.append(1) or real_generate(*args, **kwargs))
    calls.clear()
    synthesize.main(stopped)
    assert "synthesize: outliers: resuming: 2 of 5 batches" in capsys.readouterr().out
    assert len(calls) == 3 + 3  # the 3 outlier batches left and the 3 control batches
    assert digests(stopped_layout.synth_dir) == digests(layout.synth_dir)
    assert not batches.exists(), "the written images leave nothing to resume"

    # Batches of other work (here: another seed) are never taken for this work's.
    calls.clear()
    monkeypatch.setattr(synthesize, "generate", stop_in_batch_3)
    with pytest.raises(KeyboardInterrupt):
        synthesize.main(stopped)
    monkeypatch.setattr(synthesize, "generate", real_generate)
    capsys.readouterr()
    synthesize.main(stopped.model_copy(update={"seed": 1}))
    assert "resuming" not in capsys.readouterr().out


def test_missing_outliers_say_which_stage_to_run(tmp_path, untrained_pipeline_dir):
    params, layout = _fake_run(tmp_path, untrained_pipeline_dir)
    layout.outliers.unlink()
    with pytest.raises(UserError, match="outliers.npz is missing"):
        synthesize.main(params)
    assert not layout.synth_dir.exists()


@pytest.mark.slow
def test_embeddings_far_from_the_class_token_draw_less_of_the_class(trained_digits):
    """The mechanism NCIS relies on: moving the class token's embedding away from the class
    makes the generated image less like the class. Control: the class token itself."""
    from ncis.diagnostics import fit_pixel_classifier, in_class_fraction
    from ncis.synthesize import render

    params, layout = trained_digits
    pipe = load_pipeline(layout.tiny_diffusion)
    names = list(get_benchmark("digits").class_names)
    ids, positions = tokenize_prompts(pipe, params.synthesize.prompt, names)
    tokens = token_embedding_table(pipe).weight[ids[np.arange(10), positions]].detach().numpy()
    labels = np.repeat(np.arange(10), 10)
    rng = np.random.default_rng(0)
    scale = np.linalg.norm(tokens, axis=1).mean()
    far = tokens[labels] + rng.normal(size=(len(labels), tokens.shape[1])).astype(np.float32) * scale
    noise_ids = np.arange(len(labels))
    own = render(pipe, params, get_benchmark("digits"), labels, tokens[labels], noise_ids, "own")
    moved = render(pipe, params, get_benchmark("digits"), labels, far, noise_ids, "moved")
    train_x, train_y = load_images(layout.id_train, channels=1)
    classifier = fit_pixel_classifier(train_x, train_y)
    own_fraction, moved_fraction = in_class_fraction(classifier, own, labels), in_class_fraction(classifier, moved, labels)
    assert moved_fraction < own_fraction - 0.1, (own_fraction, moved_fraction)


# --- the paper's synthesis: several images per outlier embedding, through a VAE -----------------


def test_outlier_rows_render_each_embedding_images_per_embedding_times():
    labels, picks = synthesize.outlier_rows(pool_size=3, classes=2, images_per_class=0, images_per_embedding=2)
    assert labels.tolist() == [0] * 6 + [1] * 6 and picks.tolist() == [0, 0, 1, 1, 2, 2] * 2



def test_a_set_number_of_images_draws_each_groups_embedding_from_the_whole_pool():
    """As the paper: a group of images_per_embedding images shares one embedding, drawn at random
    (with replacement, seeded) from all of its class's pool, not the pool's first (lowest-density) ones."""
    labels, picks = synthesize.outlier_rows(pool_size=100, classes=3, images_per_class=32, images_per_embedding=8, seed=0)
    assert labels.tolist() == [0] * 32 + [1] * 32 + [2] * 32
    groups = picks.reshape(3, 4, 8)
    assert (groups == groups[..., :1]).all()  # 8 images per embedding
    assert groups[..., 0].max() >= 4  # not the first four of the pool
    assert not (groups[0] == groups[1]).all()  # each class draws its own
    again, other = synthesize.outlier_rows(100, 3, 32, 8, seed=0)[1], synthesize.outlier_rows(100, 3, 32, 8, seed=1)[1]
    assert (again == picks).all() and not (other == picks).all()
    assert synthesize.outlier_rows(3, 1, 5, 2, seed=0)[1].size == 5  # a last, partial group


def _paper_run(tmp_path, model_dir, *more):
    """configs/cifar100.yaml with the tiny Stable Diffusion, fake embeddings and two outliers per class."""
    params = load_params(
        "configs/cifar100.yaml",
        overrides=[
            f"outputs={tmp_path}",
            f"diffusion.model={model_dir}",
            "tracking.enabled=false",
            "synthesize.steps=2",
            "synthesize.images_per_class=2",
            "synthesize.control_per_class=1",
            "synthesize.preview_per_class=1",
            *more,
        ],
    )
    layout = layout_for(params)
    rng = np.random.default_rng(0)
    labels = np.arange(200) % 100
    write_image_folder(layout.id_train, rng.integers(0, 256, (200, 32, 32, 3), dtype=np.uint8), labels)
    save_arrays(layout.embeddings, embeddings=rng.normal(size=(200, 32)).astype(np.float32), labels=labels)
    save_arrays(layout.outliers, outliers=rng.normal(size=(100, 2, 32)).astype(np.float32), labels=np.arange(100))
    return params, layout


def test_synthesize_renders_each_outlier_embedding_as_several_rgb_images(tmp_path, tiny_sd_dir, monkeypatch):
    params, layout = _paper_run(tmp_path, tiny_sd_dir, "synthesize.images_per_embedding=2", "synthesize.save_size=24")
    calls = []
    render = synthesize.render

    def recording_render(pipe, params, benchmark, labels, vectors, noise_ids, desc, saved=None):
        images = render(pipe, params, benchmark, labels, vectors, noise_ids, desc, saved)
        calls.append((labels, vectors, noise_ids, images))
        return images

    monkeypatch.setattr(synthesize, "render", recording_render)
    synthesize.main(params)

    labels, vectors, noise_ids, rendered = calls[0]
    assert rendered.shape == (200, 24, 24, 3)
    # Images 2k and 2k+1 share one of class k's outlier embeddings (drawn from its pool as the
    # paper does) but not their starting noise.
    assert labels.tolist() == np.repeat(np.arange(100), 2).tolist()
    outliers = load_arrays(layout.outliers)["outliers"]
    _, picks = synthesize.outlier_rows(outliers.shape[1], 100, 2, 2, params.seed)
    np.testing.assert_array_equal(vectors[0::2], outliers[np.arange(100), picks[0::2]])
    np.testing.assert_array_equal(vectors[1::2], vectors[0::2])
    assert len(set(noise_ids.tolist())) == 200
    assert not np.array_equal(rendered[0], rendered[1])
    images, saved_labels = load_images(layout.synthetic_images)
    assert images.shape == (200, 24, 24, 3) and np.bincount(saved_labels).tolist() == [2] * 100
    with Image.open(layout.synthetic_images / "99" / "1.png") as png:
        assert png.mode == "RGB" and png.size == (24, 24)
    np.testing.assert_array_equal(images, rendered)


def test_an_images_pixels_do_not_depend_on_the_batch_size(tiny_sd_dir):
    pipe = load_pipeline(tiny_sd_dir)
    labels = np.array([0, 0, 5, 5, 9])
    vectors = np.random.default_rng(0).normal(size=(5, 32)).astype(np.float32)
    rendered = []
    for batch_size in (1, 2, 5):
        params = load_params("configs/cifar100.yaml", overrides=["synthesize.steps=2", "synthesize.save_size=64", f"synthesize.batch_size={batch_size}"])
        rendered.append(synthesize.render(pipe, params, get_benchmark("cifar100"), labels, vectors, np.arange(5), "test"))
    assert rendered[0].shape == (5, 64, 64, 3)
    for other in rendered[1:]:
        assert np.abs(other.astype(int) - rendered[0]).max() <= 1  # float rounding in a batched UNet at most


@pytest.mark.parametrize(
    "shape, message",
    [((9, 3, 16), "outliers for 9 classes, the benchmark has 10"), ((10, 3, 12), "dimension 12, the diffusion model's tokens have 16")],
)
def test_outliers_for_another_benchmark_or_model_are_refused_naming_the_fix(tmp_path, untrained_pipeline_dir, shape, message):
    params, layout = _fake_run(tmp_path, untrained_pipeline_dir)
    save_arrays(layout.outliers, outliers=np.zeros(shape, np.float32), labels=np.arange(shape[0]))
    with pytest.raises(UserError, match=message) as refused:
        synthesize.main(params)
    assert "rerun `ncis embed` and `ncis sample`" in str(refused.value)
    assert not layout.synth_dir.exists() and not layout.synthesize_batches.exists()
