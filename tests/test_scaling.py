"""GPU fast paths: their device-right defaults leave CPU runs as they were."""

from __future__ import annotations

import torch
from diffusers.models.attention_processor import AttnProcessor2_0

from ncis.classifiers import loader_workers
from ncis.config import is_placement, load_params
from ncis.diffusion import load_pipeline
from ncis.runtime import autocast_dtype, compiled


def test_the_unet_attends_through_pytorch_sdpa(untrained_pipeline_dir):
    pipe = load_pipeline(untrained_pipeline_dir)
    processors = pipe.unet.attn_processors
    assert processors and all(isinstance(p, AttnProcessor2_0) for p in processors.values())


def test_auto_settings_change_nothing_on_the_cpu_and_speed_up_cuda():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert autocast_dtype("auto", cpu) is None and autocast_dtype("auto", cuda) == torch.bfloat16
    assert autocast_dtype("float32", cuda) is None and autocast_dtype("bfloat16", cpu) == torch.bfloat16
    assert loader_workers("auto", cpu) == 0 and loader_workers("auto", cuda) >= 1 and loader_workers(3, cpu) == 3
    params = load_params()
    assert params.classifier.precision == "auto" and params.classifier.num_workers == "auto" and params.compile is False
    # They change results (augmentation streams, rounding), so DVC reruns a stage for them.
    assert not any(is_placement(k) for k in ("compile", "classifier.precision", "classifier.num_workers"))


def test_compile_is_off_unless_asked_and_compiles_the_same_module_when_asked():
    module = torch.nn.Linear(3, 2)
    assert compiled(module, False) is module
    fast = compiled(module, True)
    # torch.compile's wrapper around this very module (its parameters, its state dict), not a copy
    assert isinstance(fast, torch._dynamo.eval_frame.OptimizedModule) and fast._orig_mod is module
    images = torch.rand(4, 3, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fast(images), module(images))  # a linear layer: compiled or not, the same numbers


def test_bfloat16_classifier_training_computes_in_bfloat16_on_the_cpu(tmp_path, monkeypatch):
    """precision=bfloat16 trains under autocast: convolutions and the logits layer compute in
    bfloat16 (float32 weights); float32 keeps every layer in float32."""
    from test_classifier import make_tiny_data, tiny_params

    from ncis import train_classifier

    make_tiny_data(tmp_path)
    dtypes: set[torch.dtype] = set()
    build = train_classifier.build_classifier

    def watched(*args, **kwargs):
        model = build(*args, **kwargs)
        for layer in model.modules():
            if isinstance(layer, (torch.nn.Conv2d, torch.nn.Linear)):
                layer.register_forward_hook(lambda module, inputs, output: dtypes.add(output.dtype))
        return model

    monkeypatch.setattr(train_classifier, "build_classifier", watched)
    config = train_classifier.main(tiny_params(tmp_path, epochs=1, precision="bfloat16"))
    assert dtypes == {torch.bfloat16}
    assert torch.isfinite(torch.tensor(config["train_stats"]["train/loss"]))
    dtypes.clear()
    train_classifier.main(tiny_params(tmp_path, epochs=1, precision="float32"))  # other settings: trains from scratch
    assert dtypes == {torch.float32}


def test_gradient_checkpointing_inverts_to_the_same_vectors(untrained_pipeline_dir):
    from ncis import embed
    from ncis.diffusion import encode_images, token_embedding_table, tokenize_prompts
    from ncis.runtime import item_generator

    params = load_params(overrides=["embed.steps=2", "embed.noise_draws=3"])
    pipe = load_pipeline(untrained_pipeline_dir)
    ids, positions = tokenize_prompts(pipe, params.embed.prompt, ["zero", "one"])
    init = token_embedding_table(pipe).weight[ids[torch.arange(2), positions]].detach()
    latents = encode_images(pipe, torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(1)))

    def vectors():
        return embed.invert(pipe, latents, ids, positions, init, [item_generator(0, i) for i in range(2)], params.embed).vectors

    plain = vectors()
    pipe.unet.enable_gradient_checkpointing()
    assert any(getattr(m, "gradient_checkpointing", False) for m in pipe.unet.modules())
    assert torch.allclose(vectors(), plain, atol=1e-6) and (plain - init).abs().max() > 1e-3
    assert is_placement("embed.gradient_checkpointing")
