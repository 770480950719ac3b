"""Stage `embed`: textual inversion of the class token, one vector per training image.

Only the class token's input embedding is optimised (text encoder, UNet and VAE are
frozen), starting from the token's own embedding. Each image owns its vector and its
noise stream (seeded by the image's index), and the loss is a sum of per-image means,
so an image's result does not depend on which images share its batch. The vectors, the
noising and the loss stay float32 whatever precision the model runs in.

Work is saved in chunks as they finish; a stopped run resumes at the first missing chunk.
Under torchrun every rank inverts its share of the chunks and rank 0 merges them: a chunk is
computed the same way whichever process computes it, so the result is the single process's.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torchvision import transforms
from tqdm.auto import tqdm

from ncis import distributed, tracking
from ncis.config import EmbedParams, Params
from ncis.datasets import get_benchmark, image_folder
from ncis.diffusion import (
    encode_images,
    image_channels,
    load_for_params,
    model_work_key,
    resolution,
    substituted_tokens,
    token_embedding_table,
    tokenize_prompts,
)
from ncis.errors import UserError
from ncis.io import load_arrays, save_arrays, write_json
from ncis.layout import layout_for
from ncis.resume import claim
from ncis.runtime import compiled, item_generator, resolve_device


@dataclass
class InversionResult:
    vectors: torch.Tensor  # [B, D]
    losses: torch.Tensor  # [B], mean epsilon MSE of the last step


# float16 gradients of a mean over many latent pixels underflow: the loss is scaled before the
# backward pass and the gradient unscaled in float32, starting where torch.amp.GradScaler starts.
FLOAT16_LOSS_SCALE = 2.0**16


def invert(
    pipe,
    latents: torch.Tensor,
    ids: torch.Tensor,
    positions: torch.Tensor,
    init_vectors: torch.Tensor,
    generators: list[torch.Generator],
    settings: EmbedParams,
) -> InversionResult:
    """Optimise one class-token vector per image (rows of `latents`) with Adam on the epsilon MSE."""
    device = latents.device
    batch, draws = latents.shape[0], settings.noise_draws
    model_dtype = pipe.unet.dtype
    vectors = init_vectors.detach().clone().float().to(device).requires_grad_(True)
    optimizer = torch.optim.Adam([vectors], lr=settings.lr)
    loss_scale = FLOAT16_LOSS_SCALE
    scheduler = pipe.scheduler
    latents_per_draw = latents.float().repeat_interleave(draws, dim=0)
    for _ in range(settings.steps):
        noise = torch.stack([torch.randn((draws, *latents.shape[1:]), generator=g) for g in generators]).to(device)
        timesteps = torch.stack(
            [torch.randint(0, settings.timestep_count, (draws,), generator=g) * settings.timestep_stride + 1 for g in generators]
        ).to(device)
        noise, timesteps = noise.flatten(0, 1), timesteps.flatten()
        noisy = scheduler.add_noise(latents_per_draw, noise, timesteps).to(model_dtype)

        def image_losses() -> torch.Tensor:
            with substituted_tokens(pipe.text_encoder, positions, vectors):
                hidden = pipe.text_encoder(ids.to(device))[0]
            prediction = pipe.unet(noisy, timesteps, encoder_hidden_states=hidden.repeat_interleave(draws, dim=0)).sample
            return (prediction.float() - noise.float()).pow(2).flatten(1).mean(1).view(batch, draws).mean(1)

        optimizer.zero_grad(set_to_none=True)
        if model_dtype == torch.float16:
            per_image, loss_scale = _scaled_backward(image_losses, vectors, loss_scale)
        else:
            per_image = image_losses()
            # A sum keeps each image's gradient independent of the batch size.
            per_image.sum().backward()
        optimizer.step()
    return InversionResult(vectors.detach().cpu(), per_image.detach().cpu())


def _scaled_backward(image_losses, vectors: torch.Tensor, scale: float) -> tuple[torch.Tensor, float]:
    """`image_losses()` with the float32 gradient of their sum in `vectors.grad`, backpropagated at
    `scale` and unscaled. An overflow halves the scale and recomputes: Adam's step hardly depends
    on the gradient's scale, so unlike GradScaler no step is skipped."""
    while True:
        per_image = image_losses()
        (per_image.sum() * scale).backward()
        if torch.isfinite(vectors.grad).all():
            vectors.grad /= scale
            return per_image, scale
        if scale < 2:
            raise UserError("embed: non-finite gradients in float16; set embed.dtype=bfloat16 or float32")
        vectors.grad = None
        scale /= 2


def _work_key(params: Params, images: Path) -> str:
    """Chunks are reused only by the same work: settings, model files and training images alike
    (a hub model changes no local file, but a re-prepared dataset does)."""
    settings = {
        "embed": params.embed.model_dump(exclude={"gradient_checkpointing"}),  # memory, not results
        "token_names": get_benchmark(params.benchmark).token_names,
    }
    return model_work_key(params, params.embed.dtype, settings, {"images": images})


def main(params: Params) -> dict:
    settings = params.embed
    layout = layout_for(params)
    benchmark = get_benchmark(params.benchmark)
    device = resolve_device(params.device)

    # 1. The model, and the training images at its resolution: the original files where the
    #    benchmark keeps them (ImageNet-100: the paper resizes and crops the JPEGs to 512).
    pipe = load_for_params(params, device, settings.dtype)
    if settings.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    pipe.unet = compiled(pipe.unet, params.compile)
    side = resolution(pipe)
    mode = "RGB" if image_channels(pipe) == 3 else "L"
    images_folder = benchmark.original_train_images(layout)
    dataset = image_folder(
        images_folder,
        transform=transforms.Compose(
            [transforms.Lambda(lambda im: im.convert(mode)), transforms.Resize(side), transforms.CenterCrop(side), transforms.ToTensor()]
        ),
    )
    # image_limit: evenly spaced over the (class-sorted) set, so every class keeps its share.
    count = min(len(dataset), settings.image_limit) if settings.image_limit else len(dataset)
    picked = np.unique(np.linspace(0, len(dataset) - 1, count).round().astype(int))
    count = len(picked)
    labels_all = np.asarray(dataset.targets, dtype=np.int64)[picked]

    # 2. The prompt per class in the paper's words, and the token each image's vector starts from.
    token_names = list(benchmark.token_names)
    ids_per_class, positions_per_class = tokenize_prompts(pipe, settings.prompt, token_names)
    table = token_embedding_table(pipe).weight.detach().float().cpu()
    class_tokens = table[ids_per_class[torch.arange(len(token_names)), positions_per_class]]

    # 3. Invert chunk by chunk; chunks of this same work (settings, model, images) are resumed.
    #    Under torchrun each rank takes every world_size-th chunk; rank 0 claims the folder first.
    chunks = layout.embed_dir / "chunks"
    if distributed.is_main():
        claim(chunks, _work_key(params, images_folder))
    distributed.barrier()
    starts = list(range(0, count, settings.chunk_size))
    mine = distributed.shard(starts)
    resumed = sum((chunks / f"{start:08d}.npz").exists() for start in mine)
    if resumed:
        print(f"embed: resuming: {resumed} of {len(mine)} chunks are already in {chunks}")
    progress = tqdm(total=sum(min(start + settings.chunk_size, count) - start for start in mine), desc="embed: textual inversion", unit="img")
    for start in mine:
        path = chunks / f"{start:08d}.npz"
        stop = min(start + settings.chunk_size, count)
        if path.exists():
            progress.update(stop - start)
            continue
        vectors, losses = [], []
        for batch_start in range(start, stop, settings.batch_size):
            indices = list(range(batch_start, min(batch_start + settings.batch_size, stop)))
            images = torch.stack([dataset[picked[i]][0] for i in indices]).to(device)
            labels = torch.from_numpy(labels_all[indices])
            with torch.no_grad():
                latents = encode_images(pipe, images)
            result = invert(
                pipe,
                latents,
                ids_per_class[labels],
                positions_per_class[labels],
                class_tokens[labels],
                [item_generator(params.seed, index) for index in picked[indices].tolist()],
                settings,
            )
            vectors.append(result.vectors)
            losses.append(result.losses)
            progress.update(len(indices))
        save_arrays(path, embeddings=torch.cat(vectors).numpy().astype(np.float32), losses=torch.cat(losses).numpy())
    progress.close()
    distributed.barrier()
    if not distributed.is_main():
        return {}

    # 4. Rank 0 merges the chunks in order.
    parts = [load_arrays(chunks / f"{start:08d}.npz") for start in starts]
    embeddings = np.concatenate([p["embeddings"] for p in parts])
    losses = np.concatenate([p["losses"] for p in parts])
    save_arrays(
        layout.embeddings,
        embeddings=embeddings,
        labels=labels_all,
        losses=losses,
        class_tokens=class_tokens.numpy().astype(np.float32),
    )
    shift = np.linalg.norm(embeddings - class_tokens.numpy()[labels_all], axis=1)
    summary = {
        "images": int(count),
        "dim": int(embeddings.shape[1]),
        "final_loss_mean": float(losses.mean()),
        "shift_from_class_token_mean": float(shift.mean()),
        "class_token_norm_mean": float(np.linalg.norm(class_tokens.numpy(), axis=1).mean()),
    }
    write_json(layout.embed_dir / "summary.json", summary)
    tracking.log_metrics({f"embed/{k}": v for k, v in summary.items()})
    print(f"embed: {count} embeddings of dimension {embeddings.shape[1]} written to {layout.embeddings}")
    return summary
