"""Stage `embed`: batched textual inversion, independence from batch composition, resume."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from ncis import embed
from ncis.config import load_params
from ncis.datasets import write_image_folder
from ncis.diffusion import encode_images, load_pipeline, token_embedding_table, tokenize_prompts
from ncis.errors import UserError
from ncis.io import load_arrays
from ncis.layout import layout_for
from ncis.runtime import item_generator

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


def _params(tmp_path, model_dir, *more):
    return load_params(
        overrides=[
            f"outputs={tmp_path}",
            f"diffusion.model={model_dir}",
            "tracking.enabled=false",
            "embed.steps=2",
            "embed.noise_draws=4",
            *more,
        ]
    )


def _write_id_train(layout, count=12):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (count, 8, 8, 1), dtype=np.uint8)
    write_image_folder(layout.id_train, images, np.arange(count) % 3)


def test_an_images_vector_does_not_depend_on_its_batch(tmp_path, untrained_pipeline_dir):
    params = _params(tmp_path, untrained_pipeline_dir)
    pipe = load_pipeline(untrained_pipeline_dir)
    labels = torch.tensor([0, 1, 2, 1])
    ids, positions = tokenize_prompts(pipe, params.embed.prompt, [NAMES[c] for c in labels])
    init = token_embedding_table(pipe).weight[ids[torch.arange(4), positions]].detach()
    latents = encode_images(pipe, torch.rand(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)))

    together = embed.invert(pipe, latents, ids, positions, init, [item_generator(0, i) for i in range(4)], params.embed)
    alone = [
        embed.invert(pipe, latents[i : i + 1], ids[i : i + 1], positions[i : i + 1], init[i : i + 1], [item_generator(0, i)], params.embed)
        for i in range(4)
    ]
    assert torch.allclose(together.vectors, torch.cat([a.vectors for a in alone]), atol=1e-5)
    # The vectors moved from the token they started at, each its own way.
    assert (together.vectors - init).norm(dim=1).min() > 0
    assert not torch.allclose(together.vectors[1], together.vectors[3])


def test_embed_writes_vectors_and_resumes_from_saved_chunks(tmp_path, untrained_pipeline_dir):
    params = _params(tmp_path, untrained_pipeline_dir, "embed.chunk_size=5", "embed.batch_size=3")
    layout = layout_for(params)
    _write_id_train(layout)
    embed.main(params)
    first = load_arrays(layout.embeddings)
    assert first["embeddings"].shape == (12, 16) and first["embeddings"].dtype == np.float32
    assert first["labels"].tolist() == [0] * 4 + [1] * 4 + [2] * 4
    assert first["class_tokens"].shape == (10, 16)

    # A run stopped after its first chunk: the finished chunk is kept, not recomputed.
    chunks = sorted((layout.embed_dir / "chunks").glob("*.npz"))
    assert len(chunks) == 3
    kept_mtime = chunks[0].stat().st_mtime_ns
    for chunk in chunks[1:]:
        chunk.unlink()
    layout.embeddings.unlink()
    embed.main(params)
    assert chunks[0].stat().st_mtime_ns == kept_mtime
    np.testing.assert_allclose(load_arrays(layout.embeddings)["embeddings"], first["embeddings"], atol=1e-6)

    # Other settings: earlier chunks are not reused.
    embed.main(_params(tmp_path, untrained_pipeline_dir, "embed.chunk_size=5", "embed.batch_size=3", "embed.lr=0.5"))
    assert not np.allclose(load_arrays(layout.embeddings)["embeddings"], first["embeddings"])


def test_embed_without_prepared_data_says_what_to_run(tmp_path, untrained_pipeline_dir):
    with pytest.raises(UserError, match="ncis prepare"):
        embed.main(_params(tmp_path, untrained_pipeline_dir))


def test_saved_chunks_are_keyed_by_the_model_files_and_the_training_images(tmp_path, untrained_pipeline_dir):
    """A retrained model (same folder, new files) or a re-prepared dataset must not reuse the old chunks."""
    import shutil

    model_dir = tmp_path / "model"
    shutil.copytree(untrained_pipeline_dir, model_dir)
    images = tmp_path / "train"
    write_image_folder(images, np.zeros((2, 8, 8, 1), np.uint8), np.array([0, 1]))
    params = _params(tmp_path, model_dir)
    before = embed._work_key(params, images)
    assert embed._work_key(params, images) == before
    weights = next(model_dir.rglob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b"\0")
    assert embed._work_key(params, images) != before
    # A hub model changes no local file: the training images alone must tell a re-prepared dataset.
    hub = _params(tmp_path, "CompVis/stable-diffusion-v1-4")
    key = embed._work_key(hub, images)
    write_image_folder(images, np.full((2, 8, 8, 1), 255, np.uint8), np.array([1, 0]))
    assert embed._work_key(hub, images) != key


# --- Stable Diffusion's shape: textual inversion through a VAE ----------------------------------

PAPER = "configs/cifar100.yaml"


def _paper_params(tmp_path, model_dir, *more):
    return load_params(
        PAPER,
        overrides=[
            f"outputs={tmp_path}",
            f"diffusion.model={model_dir}",
            "tracking.enabled=false",
            "embed.steps=2",
            "embed.noise_draws=2",
            "embed.batch_size=3",
            *more,
        ],
    )


def _recording_loader(monkeypatch, module, seen: dict):
    """Wrap `module.load_for_params` so the UNet's and the VAE encoder's inputs are recorded."""
    original = module.load_for_params

    def load(*args, **kwargs):
        pipe = original(*args, **kwargs)
        pipe.unet.register_forward_pre_hook(lambda m, inputs: seen.setdefault("unet", []).append(tuple(inputs[0].shape)))
        pipe.vae.encoder.register_forward_pre_hook(lambda m, inputs: seen.setdefault("vae", []).append(tuple(inputs[0].shape)))
        seen["pipe"] = pipe
        return pipe

    monkeypatch.setattr(module, "load_for_params", load)


def test_embed_inverts_rgb_images_through_the_vae(tmp_path, tiny_sd_dir, monkeypatch):
    params = _paper_params(tmp_path, tiny_sd_dir)
    layout = layout_for(params)
    rng = np.random.default_rng(0)
    write_image_folder(layout.id_train, rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8), np.array([0, 0, 1, 1, 99]))
    seen: dict = {}
    _recording_loader(monkeypatch, embed, seen)
    embed.main(params)

    saved = load_arrays(layout.embeddings)
    width = seen["pipe"].text_encoder.config.hidden_size
    assert saved["embeddings"].shape == (5, width) and saved["embeddings"].dtype == np.float32
    assert saved["class_tokens"].shape == (100, width) and saved["labels"].tolist() == [0, 0, 1, 1, 99]
    # CIFAR's 32x32 RGB images enter the VAE at the model's 64x64 resolution (one at a time: sliced) ...
    assert set(seen["vae"]) == {(1, 3, 64, 64)} and len(seen["vae"]) == 5
    # ... and the UNet denoises 4-channel latents at 1/8 of it: batch x noise draws rows.
    assert set(seen["unet"]) == {(3 * 2, 4, 8, 8), (2 * 2, 4, 8, 8)}
    assert (np.linalg.norm(saved["embeddings"] - saved["class_tokens"][saved["labels"]], axis=1) > 0).all()


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_inversion_keeps_vectors_and_loss_in_float32(tmp_path, tiny_sd_dir, dtype):
    params = _paper_params(tmp_path, tiny_sd_dir)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(1))
    results = {}
    for precision in (torch.float32, dtype):
        pipe = load_pipeline(tiny_sd_dir, dtype=precision)
        ids, positions = tokenize_prompts(pipe, params.embed.prompt, ["bear", "bee"])
        init = token_embedding_table(pipe).weight[ids[torch.arange(2), positions]].detach()
        with torch.no_grad():
            latents = encode_images(pipe, images)
        assert latents.dtype == precision
        result = embed.invert(pipe, latents, ids, positions, init, [item_generator(0, i) for i in range(2)], params.embed)
        results[precision] = result, result.vectors - init.float()
    (half, half_move), (full, full_move) = results[dtype], results[torch.float32]
    assert half.vectors.dtype == half.losses.dtype == torch.float32
    # The half-precision model moves the vectors as the float32 one does. (Adam's first steps are
    # ~lr * sign(gradient): an element whose gradient is ~0 may step either way in either precision.)
    assert torch.nn.functional.cosine_similarity(half_move, full_move).min() > 0.9
    torch.testing.assert_close(half.losses, full.losses, atol=0.05, rtol=0.05)


def test_float16_loss_scale_halves_on_overflow_and_unscales_the_gradient():
    vectors = torch.zeros(2, 3, requires_grad=True)
    # d(loss)/d(vectors) = 1000: at 2**16 the float16 gradient overflows; 64 is the first scale that fits.
    per_image, scale = embed._scaled_backward(lambda: (vectors.half() * 1000).float().sum(1), vectors, embed.FLOAT16_LOSS_SCALE)
    assert scale == 64
    assert vectors.grad.dtype == torch.float32 and torch.equal(vectors.grad, torch.full((2, 3), 1000.0))
    assert per_image.shape == (2,)
