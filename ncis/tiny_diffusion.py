"""The digits benchmark's own text-to-image model, trained by `prepare`.

A small CLIP text encoder, a CLIP BPE tokenizer whose vocabulary covers the prompt
templates and class names, and a pixel-space UNet (no VAE), trained jointly with
classifier-free-guidance dropout and saved with `save_pretrained` in diffusers'
pipeline layout, so `ncis.diffusion.load_pipeline` loads it exactly like Stable Diffusion.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from tqdm.auto import tqdm
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from ncis import checkpoints, tracking
from ncis.diffusion import substituted_tokens, tokenize_prompts
from ncis.resume import claim, content_digest, work_key

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
MAX_TOKENS = 16  # the longest digits prompt has 10 tokens with start/end
CHECKPOINT_EVERY = 50  # steps: a stopped `prepare` loses a few seconds of training at most


def prompt_words(templates: list[str], class_names: list[str]) -> list[str]:
    text = " ".join(t.replace("{}", " ") for t in templates) + " " + " ".join(class_names)
    # CLIP's pre-tokenizer lowercases and splits words from punctuation.
    return sorted(set(re.findall(r"[a-z]+|[0-9]|[^\sa-z0-9]+", text.lower())))


def build_tokenizer(words: list[str], folder: Path) -> CLIPTokenizer:
    """A CLIP BPE tokenizer in which every word is one token (merged left to right)."""
    alphabet = sorted({c for w in words for c in w} | set("abcdefghijklmnopqrstuvwxyz"))
    vocab: list[str] = [c for c in alphabet] + [c + "</w>" for c in alphabet]
    merges: list[str] = []
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        while len(pieces) > 1:
            merge = f"{pieces[0]} {pieces[1]}"
            joined = pieces[0] + pieces[1]
            if merge not in merges:
                merges.append(merge)
            if joined not in vocab:
                vocab.append(joined)
            pieces = [joined] + pieces[2:]
    vocab += [BOS, EOS]
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=MAX_TOKENS, pad_token=EOS
    )
    for word in words:
        ids = tokenizer(word, add_special_tokens=False).input_ids
        if len(ids) != 1:  # a merge of one word broke another's: fail loudly rather than train on it
            raise RuntimeError(f"tiny tokenizer splits {word!r} into {len(ids)} tokens")
    return tokenizer


def build_pipeline(params, class_names: list[str], templates: list[str], folder: Path) -> StableDiffusionPipeline:
    """A freshly initialised tiny pipeline (tokenizer written to `folder/tokenizer`)."""
    settings = params.diffusion
    tokenizer = build_tokenizer(prompt_words(templates, class_names), folder / "tokenizer")
    width = settings.text_width
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(tokenizer),
            hidden_size=width,
            intermediate_size=width * 2,
            num_hidden_layers=2,
            num_attention_heads=4,
            max_position_embeddings=MAX_TOKENS,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
    )
    channels = tuple(settings.unet_channels)
    levels = len(channels)
    unet = UNet2DConditionModel(
        sample_size=params_image_size(params),
        in_channels=1,
        out_channels=1,
        block_out_channels=channels,
        down_block_types=("CrossAttnDownBlock2D",) * (levels - 1) + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * (levels - 1),
        layers_per_block=1,
        cross_attention_dim=width,
        attention_head_dim=8,
        norm_num_groups=8,
    )
    # Cosine betas suit small pixel-space images; PNDM without PRK steps is PLMS, as in SD.
    scheduler = PNDMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", skip_prk_steps=True, steps_offset=1)
    return StableDiffusionPipeline(
        vae=None,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def params_image_size(params) -> int:
    from ncis.datasets import get_benchmark

    return get_benchmark(params.benchmark).image_size


def _work_key(params, images: np.ndarray, labels: np.ndarray, class_names: list[str], templates: list[str]) -> str:
    # The data by content: `prepare` rewrites the same images (new file times) before training.
    data = content_digest(images, labels)
    settings = {"diffusion": params.diffusion.model_dump(), "seed": params.seed, "classes": class_names, "templates": templates}
    return work_key(dict(settings, data=data))


def train_tiny_model(
    params, images: np.ndarray, labels: np.ndarray, class_names: list[str], folder: Path, checkpoint_folder: Path | None = None
) -> dict:
    """Train the tiny model on uint8 images [N, H, W, 1] and save it to `folder`; returns stats.

    With `checkpoint_folder`, a checkpoint every CHECKPOINT_EVERY steps lets a stopped run of the
    same work resume, to the same model."""
    settings = params.diffusion
    generator = torch.Generator().manual_seed(params.seed)
    torch.manual_seed(params.seed)
    templates = [params.embed.prompt, params.synthesize.prompt]
    pipe = build_pipeline(params, class_names, templates, folder)
    unet, text_encoder = pipe.unet, pipe.text_encoder
    unet.train()
    text_encoder.train()
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)

    pixels = torch.from_numpy(images).permute(0, 3, 1, 2).float().div(127.5).sub(1)
    targets = torch.from_numpy(labels).long()
    # Both templates, so the class token is learned in the contexts embed and synthesize use.
    prompt_ids, prompt_positions = zip(*(tokenize_prompts(pipe, t, class_names) for t in templates))
    empty_ids = pipe.tokenizer([""], padding="max_length", max_length=MAX_TOKENS, return_tensors="pt").input_ids[0]
    token_table = text_encoder.get_input_embeddings()

    optimizer = torch.optim.AdamW(list(unet.parameters()) + list(text_encoder.parameters()), lr=settings.train_lr, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=settings.train_steps)
    losses, done = [], 0
    modules = {"unet": unet, "text_encoder": text_encoder}
    if checkpoint_folder is not None:
        key = _work_key(params, images, labels, class_names, templates)
        found = checkpoints.saved(checkpoint_folder, "step") if claim(checkpoint_folder, key) else []
        if found:
            done, path = found[-1]
            _, kept = checkpoints.load(path, modules=modules, optimizer=optimizer, scheduler=schedule, generators={"batches": generator})
            losses = kept["losses"].tolist()
            print(f"prepare: resuming the tiny diffusion model after step {done} from {path}")
    progress = tqdm(range(done, settings.train_steps), desc="prepare: tiny diffusion model", unit="step", initial=done, total=settings.train_steps)
    for step in progress:
        index = torch.randint(len(pixels), (settings.train_batch_size,), generator=generator)
        x0, y = pixels[index], targets[index]
        template = torch.randint(len(templates), (len(index),), generator=generator)
        ids = torch.stack([prompt_ids[t][c] for t, c in zip(template.tolist(), y.tolist())])
        positions = torch.stack([prompt_positions[t][c] for t, c in zip(template.tolist(), y.tolist())])
        dropped = torch.rand(len(index), generator=generator) < settings.cfg_dropout
        ids[dropped] = empty_ids
        class_vectors = token_table(ids[torch.arange(len(ids)), positions])
        if settings.token_noise > 0:
            # Noise on the class token teaches the UNet a continuous neighbourhood around each class
            # (not on dropped rows: their "class token" is padding of the empty prompt).
            jitter = settings.token_noise * torch.randn(class_vectors.shape, generator=generator)
            class_vectors = class_vectors + jitter * (~dropped)[:, None]
        with substituted_tokens(text_encoder, positions, class_vectors):
            hidden = text_encoder(ids)[0]
        noise = torch.randn(x0.shape, generator=generator)
        t = torch.randint(noise_scheduler.config.num_train_timesteps, (len(index),), generator=generator)
        noisy = noise_scheduler.add_noise(x0, noise, t)
        loss = F.mse_loss(unet(noisy, t, encoder_hidden_states=hidden).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
        if step % 50 == 0 or step == settings.train_steps - 1:
            recent = float(np.mean(losses[-50:]))
            progress.set_postfix(loss=f"{recent:.4f}")
            tracking.log_metrics({"diffusion/train_loss": recent}, step=step)
        if checkpoint_folder is not None and (step + 1) % CHECKPOINT_EVERY == 0:
            checkpoints.save(
                checkpoint_folder,
                "step",
                step + 1,
                modules=modules,
                optimizer=optimizer,
                scheduler=schedule,
                generators={"batches": generator},
                tensors={"losses": torch.tensor(losses, dtype=torch.float64)},
                meta={"work_key": key},
            )
    unet.eval()
    text_encoder.eval()
    pipe.save_pretrained(str(folder), safe_serialization=True)
    parameters = sum(p.numel() for p in unet.parameters()) + sum(p.numel() for p in text_encoder.parameters())
    return {"final_loss": float(np.mean(losses[-100:])), "parameters": parameters, "steps": settings.train_steps}
