"""Outlier sampling: low-density selection, determinism, class order, the three methods, the stage."""

import numpy as np
import pytest
import torch

from ncis.config import load_params
from ncis.cvpn import load_cvpn
from ncis.errors import UserError
from ncis.io import load_arrays, save_arrays
from ncis.layout import layout_for
from ncis.sample import gaussian_low_density, knn_boundary_outliers, sample_outliers
from ncis.sample import main as sample
from ncis.train_cvpn import main as train_cvpn

METHODS = ("cvpn", "linear", "knn")
NUM_CLASSES, PER_CLASS, DIM = 10, 20, 8  # digits has 10 classes


def clustered(seed=0):
    """Unit-variance classes whose means lie far apart, so every outlier should stay nearest its own class."""
    rng = np.random.default_rng(seed)
    means = 20 * rng.normal(size=(NUM_CLASSES, DIM))
    embeddings = np.repeat(means, PER_CLASS, 0) + rng.normal(size=(NUM_CLASSES * PER_CLASS, DIM))
    return embeddings.astype(np.float32), np.repeat(np.arange(NUM_CLASSES), PER_CLASS), means


def small_config(**overrides):
    return load_params().sample.model_copy(update={"candidates": 60, "keep": 4, "rounds": 3, "reg": 1e-4, **overrides})


def test_gaussian_keeps_the_lowest_densities():
    points = torch.randn(50, 5) * torch.tensor([3.0, 1.0, 1.0, 0.1, 0.01])
    selection = gaussian_low_density(points, candidates=100, keep=7, rounds=4, reg=1e-5, generator=torch.Generator().manual_seed(0))
    assert selection.kept.shape == (4 * 7, 5)
    assert selection.kept_scores.shape == (4, 7) and selection.discarded_scores.shape == (4, 93)
    assert (selection.kept_scores.max(1).values <= selection.discarded_scores.min(1).values).all()


def test_knn_keeps_the_farthest_draws():
    points = torch.randn(40, 5)
    selection = knn_boundary_outliers(
        points, candidates=80, keep=5, rounds=3, k=3, noise=0.5, boundary=10, generator=torch.Generator().manual_seed(0)
    )
    assert selection.kept.shape == (15, 5)
    assert (selection.kept_scores.max(1).values <= selection.discarded_scores.min(1).values).all()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A (barely) trained cVPN on the clustered data, via the train-cvpn stage."""
    out = tmp_path_factory.mktemp("outputs")
    params = stage_params(out)
    embeddings, labels, _ = clustered()
    save_arrays(layout_for(params).embeddings, embeddings=embeddings, labels=labels)
    train_cvpn(params)
    return load_cvpn(layout_for(params).cvpn)


@pytest.mark.parametrize("method", METHODS)
def test_shapes_class_order_and_determinism(method, trained):
    embeddings, labels, means = clustered()
    config = small_config(method=method)

    def draw(seed):
        generator = torch.Generator().manual_seed(seed)
        return sample_outliers(embeddings, labels, NUM_CLASSES, config, generator=generator, model=trained)

    first, again, other = draw(0), draw(0), draw(1)
    outliers = first["outliers"]
    assert outliers.shape == (NUM_CLASSES, 3 * 4, DIM) and outliers.dtype == np.float32
    assert first["scores"].shape == (NUM_CLASSES, 12)
    assert first["labels"].tolist() == list(range(NUM_CLASSES))
    distances = np.linalg.norm(outliers[:, :, None, :] - means[None, None], axis=-1)  # [C, M, C]
    assert (distances.argmin(-1) == np.arange(NUM_CLASSES)[:, None]).all()
    np.testing.assert_array_equal(first["outliers"], again["outliers"])
    assert not np.allclose(first["outliers"], other["outliers"])
    # Outliers lie outside the bulk of their class.
    own = distances[np.arange(NUM_CLASSES), :, np.arange(NUM_CLASSES)]
    spread = np.linalg.norm(embeddings - np.repeat(means, PER_CLASS, 0), axis=1).mean()
    assert own.mean() > spread


def test_cvpn_outliers_are_the_inverse_of_low_density_draws_in_the_cvpn_space(trained):
    """NCIS's sampling, recomputed class by class from the trained cVPN: forward the class's
    embeddings, keep the least likely Gaussian draws there, map them back with the inverse."""
    embeddings, labels, _ = clustered()
    config = small_config(method="cvpn")
    drawn = sample_outliers(embeddings, labels, NUM_CLASSES, config, generator=torch.Generator().manual_seed(0), model=trained)
    generator = torch.Generator().manual_seed(0)  # one stream, consumed in class order
    with torch.no_grad():
        for c in range(NUM_CLASSES):
            space = trained(torch.as_tensor(embeddings[labels == c]), c)
            selection = gaussian_low_density(space, candidates=60, keep=4, rounds=3, reg=1e-4, generator=generator)
            expected = trained.inverse(selection.kept.float(), c)
            np.testing.assert_allclose(drawn["outliers"][c], expected.numpy(), rtol=0, atol=1e-6)
            np.testing.assert_allclose(drawn["scores"][c], selection.kept_scores.flatten().float().numpy(), rtol=0, atol=1e-6)
            # and back: the outliers map forward onto the kept draws (the inverse of this class, not another's)
            forward = trained(torch.as_tensor(drawn["outliers"][c]), c).double()
            torch.testing.assert_close(forward, selection.kept, rtol=0, atol=1e-4)
    # The cVPN's space is not the raw one: the linear method, same seed and inputs, keeps other points.
    linear = sample_outliers(embeddings, labels, NUM_CLASSES, small_config(method="linear"), generator=torch.Generator().manual_seed(0))
    distance = np.linalg.norm(drawn["outliers"] - linear["outliers"], axis=-1)
    assert distance.min() > 1e-3, "a cVPN outlier equals the linear method's"


def stage_params(tmp_path, *extra):
    return load_params(
        overrides=[
            f"outputs={tmp_path}",
            "device=cpu",
            "tracking.enabled=false",
            "cvpn.epochs=2",
            "cvpn.hidden=16",
            "sample.candidates=60",
            "sample.keep=4",
            "sample.rounds=3",
            *extra,
        ]
    )


@pytest.mark.parametrize("method", METHODS)
def test_stage_end_to_end(tmp_path, method):
    params = stage_params(tmp_path, f"sample.method={method}")
    embeddings, labels, _ = clustered()
    save_arrays(layout_for(params).embeddings, embeddings=embeddings, labels=labels)
    if method == "cvpn":
        with pytest.raises(UserError, match="train-cvpn"):
            sample(params)
        train_cvpn(params)
    sample(params)
    written = load_arrays(layout_for(params).outliers)
    assert written["outliers"].shape == (NUM_CLASSES, 12, DIM)
    assert written["labels"].tolist() == list(range(NUM_CLASSES))
    assert str(written["method"]) == method
    sample(params)  # same seed, same file
    np.testing.assert_array_equal(load_arrays(layout_for(params).outliers)["outliers"], written["outliers"])


def test_stage_without_embeddings_names_the_stage_to_run(tmp_path):
    with pytest.raises(UserError, match="embeddings.npz"):
        sample(stage_params(tmp_path))
