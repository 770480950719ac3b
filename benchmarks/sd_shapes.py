"""Pipelines for speed measurements, built in memory without any download.

`sd14_shapes`: Stable Diffusion 1.4's UNet, VAE and CLIP text encoder at their real shapes
(the configs of CompVis/stable-diffusion-v1-4's unet/, vae/ and text_encoder/ config.json,
written out here) with random weights: speed and memory depend on shapes, not on weights.
`digits_shapes`: the digits model exactly as `prepare` builds it (params.yaml), untrained.
`tiny_sd_shapes`: SD's components at toy sizes, for trying the GPU scripts on a CPU.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import torch
from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

from ncis.diffusion import ready
from ncis.tiny_diffusion import build_pipeline, build_tokenizer, prompt_words

# SD 1.4's scheduler/scheduler_config.json (PNDM without PRK steps = PLMS).
SD_SCHEDULER = dict(
    num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
    skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False,
)
SD14_UNET = dict(
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2,
    block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32,
)
SD14_VAE = dict(
    in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, norm_num_groups=32,
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, sample_size=512, scaling_factor=0.18215,
)
SD14_TEXT = dict(
    vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
    max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768,
)
TINY_UNET = dict(SD14_UNET, block_out_channels=(16, 32), down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                 up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), layers_per_block=1, cross_attention_dim=32,
                 norm_num_groups=8, sample_size=8)
TINY_VAE = dict(SD14_VAE, block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4, sample_size=64)
TINY_TEXT = dict(SD14_TEXT, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, projection_dim=32)

PROMPTS = ["An image of a {}", "A high-quality image of the {}"]


def _sd_like(unet: dict, vae: dict, text: dict, class_names: list[str]) -> StableDiffusionPipeline:
    folder = Path(tempfile.mkdtemp(prefix="ncis-shapes-"))
    tokenizer = build_tokenizer(prompt_words(PROMPTS, class_names), folder / "tokenizer")
    tokenizer.model_max_length = text["max_position_embeddings"]
    text_config = CLIPTextConfig(
        **text, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
    )
    return StableDiffusionPipeline(
        vae=AutoencoderKL(**vae), text_encoder=CLIPTextModel(text_config), tokenizer=tokenizer,
        unet=UNet2DConditionModel(**unet), scheduler=PNDMScheduler(**SD_SCHEDULER),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )


def sd14_shapes(class_names: list[str]) -> StableDiffusionPipeline:
    return _sd_like(SD14_UNET, SD14_VAE, SD14_TEXT, class_names)


def tiny_sd_shapes(class_names: list[str]) -> StableDiffusionPipeline:
    return _sd_like(TINY_UNET, TINY_VAE, TINY_TEXT, class_names)


def digits_shapes(params, class_names: list[str]) -> StableDiffusionPipeline:
    folder = Path(tempfile.mkdtemp(prefix="ncis-digits-"))
    return build_pipeline(params, class_names, [params.embed.prompt, params.synthesize.prompt], folder)


def to_device(pipe: StableDiffusionPipeline, device: torch.device, dtype: torch.dtype) -> StableDiffusionPipeline:
    """What ncis.diffusion.load_pipeline does to a loaded pipeline (frozen, eval mode, on `device`), in `dtype`."""
    return ready(pipe.to(dtype=dtype), device)
