"""The shared diffusion loader, token substitution, and the tiny digits model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from ncis.config import load_params
from ncis.datasets import get_benchmark, load_images
from ncis.diffusion import (
    decode_latents,
    encode_images,
    encode_text,
    generate,
    initial_latents,
    load_pipeline,
    make_scheduler,
    resolution,
    tokenize_prompts,
)
from ncis.errors import UserError
from ncis.tiny_diffusion import build_tokenizer, prompt_words

from conftest import TINY_MODEL

CLASS_NAMES = list(get_benchmark("digits").class_names)
ROOT = Path(__file__).parents[1]


def test_tokenizer_makes_every_prompt_word_one_token(tmp_path):
    params = load_params()
    words = prompt_words([params.embed.prompt, params.synthesize.prompt], CLASS_NAMES)
    assert {"image", "high", "quality", "the", "zero", "nine"} <= set(words)
    tokenizer = build_tokenizer(words, tmp_path)
    for word in words:
        assert len(tokenizer(word, add_special_tokens=False).input_ids) == 1
    ids = tokenizer("A high-quality image of the seven", add_special_tokens=False).input_ids
    assert len(ids) == 8  # a, high, -, quality, image, of, the, seven


def test_save_load_round_trip_through_the_shared_loader(untrained_pipeline_dir):
    first, second = load_pipeline(untrained_pipeline_dir), load_pipeline(untrained_pipeline_dir)
    assert first.vae is None and resolution(first) == 8
    for a, b in zip(first.unet.state_dict().values(), second.unet.state_dict().values()):
        assert torch.equal(a, b)
    ids, _ = tokenize_prompts(first, "An image of a {}", CLASS_NAMES)
    assert torch.equal(encode_text(first, ids), encode_text(second, ids))
    # No VAE: latents are the images in [-1, 1], and decoding undoes encoding.
    images = torch.rand(3, 1, 8, 8)
    assert torch.allclose(decode_latents(first, encode_images(first, images)), images, atol=1e-6)


def test_loader_refuses_missing_models_with_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="no such file"):
        load_pipeline(tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="no such folder"):
        load_pipeline(tmp_path / "nothing-here")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="cannot load"):
        load_pipeline(tmp_path / "empty")


def test_class_token_positions_point_at_the_class_name(untrained_pipeline_dir):
    pipe = load_pipeline(untrained_pipeline_dir)
    for template in ("An image of a {}", "A high-quality image of the {}"):
        ids, positions = tokenize_prompts(pipe, template, CLASS_NAMES)
        for row, position, name in zip(ids, positions, CLASS_NAMES):
            assert row[position].item() == pipe.tokenizer(name, add_special_tokens=False).input_ids[0]
    with pytest.raises(UserError, match="no '\\{\\}'"):
        tokenize_prompts(pipe, "no placeholder", CLASS_NAMES)


def _first_token_position(tokenizer, prompt: str, prefix: str, word: str) -> int:
    """Where `word` starts in the tokenized prompt, counted by hand: 1 (start token) + the tokens of
    the text before its first whole-word occurrence after the template's prefix."""
    import re

    start = re.compile(rf"(?<![a-z]){re.escape(word)}(?![a-z])").search(prompt.lower(), len(prefix)).start()
    return 1 + len(tokenizer(prompt[:start], add_special_tokens=False).input_ids)


@pytest.mark.parametrize("benchmark", ["cifar100", "imagenet100"])
def test_a_class_word_of_several_tokens_is_inverted_and_swapped_at_its_first_token(tiny_sd_dir, benchmark):
    from conftest import TINY_SD_SPLIT_WORDS

    pipe = load_pipeline(tiny_sd_dir)
    tokenizer, names = pipe.tokenizer, get_benchmark(benchmark)
    params = load_params(ROOT / "configs" / f"{benchmark}.yaml")
    split = {w: tokenizer(w, add_special_tokens=False).input_ids for w in TINY_SD_SPLIT_WORDS}
    assert all(len(ids) == 2 for ids in split.values())  # as SD's `cockroach` = co|ck|roach
    # embed writes the token names, synthesize the prompt names and swaps the token names' token.
    for template, words in ((params.embed.prompt, names.token_names), (params.synthesize.prompt, names.prompt_names)):
        ids, positions = tokenize_prompts(pipe, template, list(words), list(names.token_names))
        prefix = template.split("{}")[0]
        for row, position, word, token in zip(ids.tolist(), positions.tolist(), words, names.token_names):
            prompt = template.format(word)
            first = tokenizer(token, add_special_tokens=False).input_ids
            assert position == _first_token_position(tokenizer, prompt, prefix, token.split()[0]), prompt
            assert row[position : position + len(first)] == first, prompt  # its first token, then the rest
    # The split words are there: a split token name, and a split word ahead of the token ('aquarium' fish).
    assert {"cockroach", "agama"} & set(names.token_names)
    if benchmark == "cifar100":
        assert "aquarium fish" in names.prompt_names and "fish" in names.token_names


def test_a_class_token_the_prompt_cannot_hold_is_a_one_line_error_naming_the_fix(tiny_sd_dir):
    pipe = load_pipeline(tiny_sd_dir)
    long = "An image of " + "a " * pipe.tokenizer.model_max_length + "{}"  # truncated before the class name
    with pytest.raises(UserError, match=r"class token of 'cockroach' not found in the tokenized prompt .*; shorten the prompt$") as error:
        tokenize_prompts(pipe, long, ["cockroach"])
    assert "\n" not in str(error.value)
    # A prompt that holds the first token only (the second is cut for the end token) is found, not refused.
    last = pipe.tokenizer.model_max_length - 2  # the last place before the end token
    ids, positions = tokenize_prompts(pipe, "An image of " + "a " * (last - 4) + "{}", ["cockroach"])
    first, _ = pipe.tokenizer("cockroach", add_special_tokens=False).input_ids
    assert positions.tolist() == [last] and ids[0, last:].tolist() == [first, pipe.tokenizer.eos_token_id]


def test_token_substitution_changes_only_its_row_and_carries_gradients(untrained_pipeline_dir):
    pipe = load_pipeline(untrained_pipeline_dir)
    ids, positions = tokenize_prompts(pipe, "An image of a {}", CLASS_NAMES[:3])
    table = pipe.text_encoder.get_input_embeddings().weight
    own = table[ids[torch.arange(3), positions]].detach()
    plain = encode_text(pipe, ids)
    assert torch.allclose(encode_text(pipe, ids, positions, own), plain, atol=1e-6)
    vectors = own.clone()
    vectors[1] += torch.randn(vectors.shape[1], generator=torch.Generator().manual_seed(0))  # not constant: LayerNorm would cancel it
    vectors.requires_grad_(True)
    changed = encode_text(pipe, ids, positions, vectors)
    assert torch.allclose(changed[0], plain[0], atol=1e-6) and torch.allclose(changed[2], plain[2], atol=1e-6)
    assert not torch.allclose(changed[1], plain[1], atol=1e-3)
    changed.sum().backward()
    assert vectors.grad is not None and vectors.grad[1].abs().sum() > 0
    # The shared table is untouched.
    assert torch.equal(pipe.text_encoder.get_input_embeddings().weight, table)


def test_generation_is_seeded_and_any_scheduler_can_be_named(untrained_pipeline_dir):
    pipe = load_pipeline(untrained_pipeline_dir)
    ids, _ = tokenize_prompts(pipe, "A high-quality image of the {}", CLASS_NAMES[:2])
    embeds = encode_text(pipe, ids)
    noise = lambda: initial_latents(pipe, [torch.Generator().manual_seed(i) for i in range(2)])  # noqa: E731
    a = generate(pipe, embeds, 5, 3.0, noise())
    b = generate(pipe, embeds, 5, 3.0, noise())
    assert a.shape == (2, 1, 8, 8) and torch.equal(a, b) and a.min() >= 0 and a.max() <= 1
    assert generate(pipe, embeds, 5, 3.0, noise(), "DDIMScheduler").shape == (2, 1, 8, 8)
    # synthesize.noise_scale widens the same draws, so a scaled start gives another image.
    wide = initial_latents(pipe, [torch.Generator().manual_seed(i) for i in range(2)], scale=2.0)
    assert torch.allclose(wide, 2 * noise()) and not torch.equal(generate(pipe, embeds, 5, 3.0, wide), a)
    with pytest.raises(UserError, match="not a diffusers scheduler"):
        make_scheduler(pipe, "Nonsense")


@pytest.mark.slow
def test_prepared_model_draws_the_prompted_digit(trained_digits):
    """Quality bar on the published model `prepare` trained, sampled at guidance 3 where it follows
    its prompt: 90%, the bar benchmarks/pipeline.py holds a fresh training to."""
    from ncis.diagnostics import fit_pixel_classifier, in_class_fraction

    params, layout = trained_digits
    pipe = load_pipeline(layout.tiny_diffusion)
    train_x, train_y = load_images(layout.id_train, channels=1)
    classifier = fit_pixel_classifier(train_x, train_y)
    labels = np.repeat(np.arange(10), 10)
    ids, _ = tokenize_prompts(pipe, params.synthesize.prompt, [CLASS_NAMES[c] for c in labels])
    latents = initial_latents(pipe, [torch.Generator().manual_seed(i) for i in range(len(labels))])
    images = generate(pipe, encode_text(pipe, ids), 50, 3.0, latents)
    pixels = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    accuracy = in_class_fraction(classifier, pixels, labels)
    assert accuracy >= 0.9, f"only {accuracy:.0%} of generated digits are the prompted class"


# --- Stable Diffusion's shape: a latent UNet behind a VAE (tiny_sd_dir, tests/conftest.py) ---


def test_stable_diffusion_loads_with_its_vae(tiny_sd_dir):
    from diffusers import AutoencoderKL

    from ncis.diffusion import image_channels

    pipe = load_pipeline(tiny_sd_dir)
    assert isinstance(pipe.vae, AutoencoderKL)
    assert resolution(pipe) == pipe.unet.config.sample_size * 8 == 64
    assert image_channels(pipe) == 3
    assert not any(p.requires_grad for p in pipe.vae.parameters())


def test_vae_latents_are_the_posterior_mode_times_the_vaes_own_scaling_factor(tiny_sd_dir):
    pipe = load_pipeline(tiny_sd_dir)
    images = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    latents = encode_images(pipe, images)
    assert latents.shape == (2, 4, 8, 8)
    mode = pipe.vae.encode(images * 2 - 1).latent_dist.mode()
    assert pipe.vae.config.scaling_factor == 0.5  # the fixture's, not SD's 0.18215
    torch.testing.assert_close(latents, mode * 0.5)
    decoded = decode_latents(pipe, latents)
    assert decoded.shape == (2, 3, 64, 64) and decoded.dtype == torch.float32
    assert decoded.min() >= 0 and decoded.max() <= 1
    # decode undoes the scaling before the VAE's decoder
    torch.testing.assert_close(decoded, ((pipe.vae.decode(mode).sample + 1) / 2).clamp(0, 1))


def test_stable_diffusion_generates_rgb_images_at_the_vae_resolution(tiny_sd_dir):
    pipe = load_pipeline(tiny_sd_dir)
    ids, _ = tokenize_prompts(pipe, "A high-quality image of the {}", ["apple", "seal"])
    latents = initial_latents(pipe, [torch.Generator().manual_seed(i) for i in range(2)])
    assert latents.shape == (2, 4, 8, 8)
    images = generate(pipe, encode_text(pipe, ids), 3, 7.5, latents)
    assert images.shape == (2, 3, 64, 64) and images.min() >= 0 and images.max() <= 1


def test_precision_auto_is_float32_on_cpu_and_float16_on_cuda():
    from ncis.diffusion import resolve_dtype

    assert resolve_dtype("auto", "cpu") == torch.float32
    assert resolve_dtype("auto", "cuda") == torch.float16  # dream_ood.py samples under autocast
    assert resolve_dtype("float32", "cuda") == torch.float32
    assert resolve_dtype("bfloat16", "cpu") == torch.bfloat16


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_loads_every_component_in_it_and_decodes_to_float32(tiny_sd_dir, dtype):
    full, half = load_pipeline(tiny_sd_dir), load_pipeline(tiny_sd_dir, dtype=dtype)
    assert {half.unet.dtype, half.vae.dtype, half.text_encoder.dtype} == {dtype}
    ids, _ = tokenize_prompts(half, "A high-quality image of the {}", ["apple"])
    noise = lambda: initial_latents(full, [torch.Generator().manual_seed(0)])  # noqa: E731
    low = generate(half, encode_text(half, ids), 3, 7.5, noise())
    assert low.dtype == torch.float32
    assert (low - generate(full, encode_text(full, ids), 3, 7.5, noise())).abs().max() < 0.1


def test_digits_model_still_loads_without_a_vae(untrained_pipeline_dir):
    from ncis.diffusion import image_channels

    pipe = load_pipeline(untrained_pipeline_dir)
    assert pipe.vae is None and image_channels(pipe) == 1 and resolution(pipe) == pipe.unet.config.sample_size


def test_a_stopped_tiny_model_training_resumes_from_its_last_checkpoint_to_the_same_model(tmp_path, monkeypatch, capsys):
    from ncis import tiny_diffusion

    params = load_params(overrides=["tracking.enabled=false", "diffusion.train_steps=60", "diffusion.train_batch_size=8", *TINY_MODEL])
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 256, (40, 8, 8, 1), dtype=np.uint8), np.arange(40) % 10
    train = lambda name: tiny_diffusion.train_tiny_model(params, images, labels, CLASS_NAMES, tmp_path / name, tmp_path / "checkpoints")  # noqa: E731
    straight = tiny_diffusion.train_tiny_model(params, images, labels, CLASS_NAMES, tmp_path / "straight")

    def stop_at_step_50(metrics, step=None):
        if step == 50:
            raise KeyboardInterrupt

    monkeypatch.setattr(tiny_diffusion.tracking, "log_metrics", stop_at_step_50)
    with pytest.raises(KeyboardInterrupt):
        train("stopped")
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_0050", "work-key.txt"]  # the newest only

    monkeypatch.undo()
    assert train("resumed") == straight
    assert "prepare: resuming the tiny diffusion model after step 50" in capsys.readouterr().out
    for name in ("unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors"):
        assert (tmp_path / "resumed" / name).read_bytes() == (tmp_path / "straight" / name).read_bytes(), name

    # Checkpoints of other work (here: other training images) are not resumed.
    images[0] = 255 - images[0]
    train("other")
    assert "resuming" not in capsys.readouterr().out
