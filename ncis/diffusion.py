"""The one way a diffusion model enters ncis: Stable Diffusion and the tiny digits model alike.

`load_pipeline` returns a diffusers `StableDiffusionPipeline`, VAE included, from a hub id
(HF cache), a local diffusers folder or a single `.ckpt`/`.safetensors` file in the original
Stable Diffusion layout. A folder saved without a VAE (the tiny digits model works in pixel
space) loads without one, and `encode_images` / `decode_latents` then treat latents as the
images themselves: one code path, not two.

Per-image token vectors reach the text encoder through a forward hook on its input
embedding module (transformers 5's `CLIPTextModel.forward` takes no `inputs_embeds`),
so the shared embedding table is never edited in place.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from ncis.errors import UserError
from ncis.io import refuse_pickled_folder, trusted_single_file

SINGLE_FILE_SUFFIXES = (".ckpt", ".safetensors")
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
# What a failed load raises: missing/unreadable files and offline hub lookups (OSError and
# huggingface_hub's errors), configs that do not fit the weights (ValueError, KeyError,
# RuntimeError from load_state_dict).
LOAD_ERRORS = (OSError, ValueError, KeyError, RuntimeError)


def resolve_dtype(name: str, device: torch.device | str) -> torch.dtype:
    """`embed.dtype` / `synthesize.dtype` -> a torch dtype; `auto` is float32 on CPU, float16 on CUDA."""
    if name == "auto":
        return torch.float16 if torch.device(device).type == "cuda" else torch.float32
    return DTYPES[name]


def load_pipeline(
    source: str | Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    single_file_config: str = "",
    allow_pickle: bool = False,
) -> StableDiffusionPipeline:
    """Load a text-to-image pipeline; frozen, in eval mode, on `device`.

    `single_file_config` (single files only): a diffusers folder or hub id holding the model's
    component configs and tokenizer; empty = the one diffusers infers from the checkpoint's keys.
    Pickled weights (.ckpt, .bin) are refused before anything reads them unless `allow_pickle`
    (ncis.io.trusted_single_file).
    """
    source = str(source)
    kwargs = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False, dtype=dtype)
    # diffusers does not load a component passed as None at all, so vae=None only where the saved
    # pipeline has no VAE: passed for any model, it would drop Stable Diffusion's autoencoder.
    if _saved_without_vae(source):
        kwargs["vae"] = None
    single_file = source.endswith(SINGLE_FILE_SUFFIXES)
    try:
        if single_file:
            with trusted_single_file(source, allow_pickle) as weights:
                pipe = StableDiffusionPipeline.from_single_file(weights, config=single_file_config or None, **kwargs)
        else:
            if not Path(source).exists() and Path(source).is_absolute():
                raise UserError(f"diffusion.model: no such folder {source}; run `ncis prepare` or fix the path")
            refuse_pickled_folder(source, allow_pickle)
            pipe = StableDiffusionPipeline.from_pretrained(source, use_safetensors=not allow_pickle or None, **kwargs)
    except LOAD_ERRORS as err:
        raise UserError(_load_error_message(source, single_file, single_file_config, err)) from None
    return ready(pipe, device)


def ready(pipe: StableDiffusionPipeline, device: torch.device | str) -> StableDiffusionPipeline:
    """A loaded (or freshly built) pipeline as every stage uses it: frozen, in eval mode, on `device`."""
    if pipe.vae is None:
        # Pixel-space model: latents are the images, so nothing is scaled.
        pipe.vae_scale_factor = 1
        pipe.image_processor.config.vae_scale_factor = 1
    else:
        # Encode and decode one image at a time: less memory at 512x512, and an image's latents
        # and pixels cannot depend on the batch it came in.
        pipe.vae.enable_slicing()
    pipe.set_progress_bar_config(disable=True)
    for module in (pipe.unet, pipe.text_encoder, pipe.vae):
        if module is not None:
            module.requires_grad_(False).eval()
    return pipe.to(device)


def _saved_without_vae(source: str) -> bool:
    """A diffusers folder whose model_index.json records no VAE (the pixel-space digits model)."""
    index = Path(source) / "model_index.json"
    if not index.is_file():
        return False
    entry = json.loads(index.read_text()).get("vae")
    return not entry or entry[0] is None


def _load_error_message(source: str, single_file: bool, single_file_config: str, err: Exception) -> str:
    text = str(err).strip()
    reason = text.splitlines()[0] if text else type(err).__name__
    if single_file:
        config = f"the configs of {single_file_config!r}" if single_file_config else "the configs diffusers infers for it"
        return (
            f"diffusion.model: cannot load the single file {source} with {config} ({reason}); a single file holds "
            "weights only: put its model's configs and tokenizer in the HF cache (hf download "
            f"{single_file_config or 'CompVis/stable-diffusion-v1-4'} --include '*.json' '*.txt', where there is "
            "network), or give a diffusers folder of the model instead"
        )
    return (
        f"diffusion.model: cannot load {source!r} ({reason}); give a diffusers folder, a hub id available "
        "offline (HF_HOME cache) or a single .ckpt/.safetensors file"
    )


def resolution(pipe: StableDiffusionPipeline) -> int:
    """Image side length the model was trained at."""
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def image_channels(pipe: StableDiffusionPipeline) -> int:
    """Channels of the images the model reads and draws (Stable Diffusion: RGB through its VAE)."""
    return int(pipe.vae.config.out_channels) if pipe.vae is not None else int(pipe.unet.config.in_channels)


def encode_images(pipe: StableDiffusionPipeline, images: torch.Tensor) -> torch.Tensor:
    """Images in [0, 1], [B, C, H, W] at the model's resolution -> latents the UNet denoises."""
    pixels = images * 2 - 1
    if pipe.vae is None:
        return pixels
    # The posterior's mode times the VAE's scaling factor, as the paper's inversion does
    # (NCIS scripts/get_embeddings/embed_c100_images_clip.py:207, `.mode() * 0.18215`, SD 1.x's
    # factor): an image's embedding does not depend on VAE noise.
    posterior = pipe.vae.encode(pixels.to(pipe.vae.device, pipe.vae.dtype)).latent_dist
    return posterior.mode() * pipe.vae.config.scaling_factor


def decode_latents(pipe: StableDiffusionPipeline, latents: torch.Tensor) -> torch.Tensor:
    """Latents -> float32 images in [0, 1], [B, C, H, W] at the model's resolution."""
    if pipe.vae is not None:
        latents = latents.to(pipe.vae.device, pipe.vae.dtype) / pipe.vae.config.scaling_factor
        latents = pipe.vae.decode(latents, return_dict=False)[0]
    return ((latents.float() + 1) / 2).clamp(0, 1)


def class_token_id(pipe: StableDiffusionPipeline, class_name: str) -> int:
    """Id of the first token of the class name: the token NCIS inverts."""
    ids = pipe.tokenizer(class_name, add_special_tokens=False).input_ids
    if not ids:
        raise UserError(f"class name {class_name!r} tokenizes to nothing; fix the benchmark's class names")
    return ids[0]


def tokenize_prompts(
    pipe: StableDiffusionPipeline, template: str, class_names: list[str], token_names: list[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids [B, L] of `template.format(name)` and the position of each class token [B]: the
    first token of `token_names[b]` (default: of the class name itself) where it occurs in row b."""
    if "{}" not in template:
        raise UserError(f"prompt {template!r} has no '{{}}' where the class name goes; e.g. 'An image of a {{}}'")
    prompts = [template.format(name) for name in class_names]
    tokens = pipe.tokenizer(
        prompts, padding="max_length", max_length=pipe.tokenizer.model_max_length, truncation=True, return_tensors="pt"
    )
    ids = tokens.input_ids
    # The class token follows the template's prefix (+1 for the start token).
    expected = len(pipe.tokenizer(template.split("{}")[0], add_special_tokens=False).input_ids) + 1
    token_names = class_names if token_names is None else token_names
    targets = {name: class_token_id(pipe, name) for name in set(token_names)}
    positions = []
    for row, name, token_name in zip(ids.tolist(), class_names, token_names):
        target, position = targets[token_name], expected
        if position >= len(row) or row[position] != target:
            position = row.index(target) if target in row else -1
        if position < 0:
            raise UserError(f"class token of {name!r} not found in the tokenized prompt {template!r}; shorten the prompt")
        positions.append(position)
    return ids, torch.tensor(positions)


def token_embedding_table(pipe: StableDiffusionPipeline) -> torch.nn.Embedding:
    return pipe.text_encoder.get_input_embeddings()


@contextlib.contextmanager
def substituted_tokens(text_encoder, positions: torch.Tensor, vectors: torch.Tensor):
    """Within the block, row b's token at `positions[b]` is embedded as `vectors[b]` (gradients flow)."""

    def replace(module, inputs, output):
        output = output.clone()
        rows = torch.arange(output.shape[0], device=output.device)
        output[rows, positions.to(output.device)] = vectors.to(output.device, output.dtype)
        return output

    handle = text_encoder.get_input_embeddings().register_forward_hook(replace)
    try:
        yield
    finally:
        handle.remove()


def encode_text(pipe: StableDiffusionPipeline, ids: torch.Tensor, positions: torch.Tensor | None = None, vectors: torch.Tensor | None = None) -> torch.Tensor:
    """Text-encoder hidden states [B, L, W], optionally with per-row class-token vectors substituted."""
    ids = ids.to(pipe.text_encoder.device)
    if vectors is None:
        return pipe.text_encoder(ids)[0]
    with substituted_tokens(pipe.text_encoder, positions, vectors):
        return pipe.text_encoder(ids)[0]


def empty_prompt_embeds(pipe: StableDiffusionPipeline, batch: int) -> torch.Tensor:
    ids = pipe.tokenizer([""] * batch, padding="max_length", max_length=pipe.tokenizer.model_max_length, return_tensors="pt").input_ids
    return encode_text(pipe, ids)


def make_scheduler(pipe: StableDiffusionPipeline, name: str):
    """A diffusers scheduler by class name, configured like the model's own (PNDM = PLMS)."""
    import diffusers

    scheduler_class = getattr(diffusers, name, None)
    if scheduler_class is None or not hasattr(scheduler_class, "from_config") or "Scheduler" not in name:
        raise UserError(f"synthesize.scheduler: {name!r} is not a diffusers scheduler; e.g. PNDMScheduler, DDIMScheduler")
    extra = {"skip_prk_steps": True} if name == "PNDMScheduler" else {}
    return scheduler_class.from_config(pipe.scheduler.config, **extra)


def initial_latents(pipe: StableDiffusionPipeline, generators: list[torch.Generator], scale: float = 1.0) -> torch.Tensor:
    """Starting noise, one generator per image: an image's noise does not depend on its batch.
    `scale` multiplies its standard deviation (> 1 starts from the tails of the prior)."""
    channels, side = int(pipe.unet.config.in_channels), int(pipe.unet.config.sample_size)
    return scale * torch.stack([torch.randn((channels, side, side), generator=g) for g in generators])


@torch.no_grad()
def generate(
    pipe: StableDiffusionPipeline,
    prompt_embeds: torch.Tensor,
    steps: int,
    guidance_scale: float,
    latents: torch.Tensor,
    scheduler_name: str = "PNDMScheduler",
) -> torch.Tensor:
    """Images in [0, 1] [B, C, H, W] from prompt embeddings and starting noise, guided against the empty prompt."""
    pipe.scheduler = make_scheduler(pipe, scheduler_name)
    side = resolution(pipe)
    latents = pipe(
        prompt_embeds=prompt_embeds,
        negative_prompt_embeds=empty_prompt_embeds(pipe, prompt_embeds.shape[0]),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        height=side,
        width=side,
        latents=latents.to(pipe.device, prompt_embeds.dtype),
        output_type="latent",
    ).images
    return decode_latents(pipe, latents)


def model_source(params) -> str:
    """`diffusion.model` if set, else the benchmark's default (digits: the tiny model `prepare` trains)."""
    from ncis.datasets import get_benchmark
    from ncis.layout import layout_for

    if params.diffusion.model:
        return params.diffusion.model
    default = get_benchmark(params.benchmark).default_diffusion
    if default == "tiny":
        folder = layout_for(params).tiny_diffusion
        if not (folder / "model_index.json").exists():
            raise UserError(f"{folder} holds no diffusion model; run `ncis prepare` first")
        return str(folder)
    return default


def model_work_key(params, dtype: str, settings: dict, inputs: dict[str, Path]) -> str:
    """The work key (ncis/resume.py) of a stage's partial results made with the model: its
    `settings`, the seed, the benchmark, the model (files included) and its precision, and the
    signature of each `inputs` folder."""
    from ncis.resume import work_key
    from ncis.runtime import resolve_device

    source = model_source(params)
    model = {
        "model": source,
        "precision": str(resolve_dtype(dtype, resolve_device(params.device))),  # auto: per device
        "seed": params.seed,
        "benchmark": params.benchmark,
    }
    return work_key({**settings, **model}, {"model": Path(source), **inputs})


def load_for_params(params, device: torch.device | str, dtype: str) -> StableDiffusionPipeline:
    """The pipeline `diffusion.*` describes, on `device`, in the precision `dtype` (a stage's `dtype` key).

    A single checkpoint file holds weights only: its configs and tokenizer come from the benchmark's
    default model (Stable Diffusion 1.4's hub id for the paper's benchmarks: sd-v1-4.ckpt's own)."""
    from ncis.datasets import get_benchmark

    default = get_benchmark(params.benchmark).default_diffusion
    return load_pipeline(
        model_source(params),
        device=device,
        dtype=resolve_dtype(dtype, device),
        single_file_config="" if default == "tiny" else default,
        allow_pickle=params.diffusion.allow_pickle,
    )
