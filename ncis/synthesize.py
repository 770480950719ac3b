"""Stage `synthesize`: outlier images from outlier embeddings.

The prompt "A high-quality image of the <class>" is encoded with the class token's
input embedding replaced by an outlier embedding; diffusers' pipeline does the rest
(classifier-free guidance against the empty prompt, PNDM/PLMS or any scheduler by name).
As in the paper, one outlier embedding renders `images_per_embedding` images (NCIS README.md:50,
`--n_samples 8`), decoded at the model's resolution and resized to `save_size` (dream_ood.py:547).
Every image has its own starting noise, keyed by its index, so no result depends on the batching.
Under torchrun each rank renders every world_size-th batch and rank 0 gathers them in order
and writes everything: the images are the single process's. Each batch is saved as it finishes
(`synthesize_batches/`), so a stopped run resumes where it stopped.
A control pool from the class's own inverted embeddings, with the same starting noise,
shows how far the outliers actually moved (`diagnostics.json`).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torchvision.utils import make_grid, save_image
from tqdm.auto import tqdm

from ncis import diagnostics, distributed, tracking
from ncis.config import Params
from ncis.datasets import get_benchmark, load_images, write_image_folder
from ncis.embeddings import load_outliers
from ncis.errors import UserError
from ncis.diffusion import (
    encode_text,
    generate,
    image_channels,
    initial_latents,
    load_for_params,
    model_work_key,
    token_embedding_table,
    tokenize_prompts,
)
from ncis.io import atomic_path, load_arrays, save_arrays, write_json
from ncis.layout import layout_for
from ncis.resume import claim
from ncis.runtime import compiled, item_generator, resolve_device

DIAGNOSTIC_IMAGES = 5000  # ID images the diagnostic classifier is fitted on, at most


def render(
    pipe, params: Params, benchmark, labels: np.ndarray, vectors: np.ndarray, noise_ids: np.ndarray, desc: str, saved: Path | None = None
) -> np.ndarray:
    """Generate one image per (label, vector) row, its starting noise keyed by `noise_ids`; uint8 [N, S, S, C].

    The prompt names the class in the paper's words (`prompt_names`, e.g. "aquarium fish"); the
    vector replaces the token `embed` inverted (first token of `token_names`, e.g. "fish").
    With `saved` (a file name prefix in a claimed folder), every batch is saved as it finishes
    and batches already there are read instead of rendered."""
    settings = params.synthesize
    if len(labels) == 0:
        return np.zeros((0, settings.save_size, settings.save_size, image_channels(pipe)), np.uint8)
    out = []
    starts = distributed.shard(range(0, len(labels), settings.batch_size))
    batch_files = [saved.with_name(f"{saved.name}-{start:08d}.npz") if saved else None for start in starts]
    resumed = sum(bool(path and path.exists()) for path in batch_files)
    if resumed:
        print(f"{desc}: resuming: {resumed} of {len(starts)} batches are already in {saved.parent}")
    for start, batch_file in zip(tqdm(starts, desc=desc, unit="batch", disable=not distributed.is_main()), batch_files):
        if batch_file and batch_file.exists():
            out.append(load_arrays(batch_file)["images"])
            continue
        rows = slice(start, start + settings.batch_size)
        ids, positions = tokenize_prompts(
            pipe, settings.prompt, [benchmark.prompt_names[c] for c in labels[rows]], [benchmark.token_names[c] for c in labels[rows]]
        )
        with torch.no_grad():
            embeds = encode_text(pipe, ids, positions, torch.from_numpy(vectors[rows]))
        generators = [item_generator(params.seed, int(n)) for n in noise_ids[rows]]
        images = generate(pipe, embeds, settings.steps, settings.guidance_scale, initial_latents(pipe, generators, settings.noise_scale), settings.scheduler)
        out.append(_to_uint8(images, settings.save_size))
        if batch_file:
            save_arrays(batch_file, images=out[-1])
    return _merged(out, starts, len(labels), settings.save_size, image_channels(pipe))


def _merged(batches: list[np.ndarray], starts: list[int], count: int, size: int, channels: int) -> np.ndarray:
    """This rank's rendered batches (from `starts`), merged with the other ranks' in row order on
    rank 0; the other ranks get an empty array."""
    every = distributed.gather(list(zip(starts, batches)))
    if every is None:
        return np.zeros((0, size, size, channels), np.uint8)
    ordered = sorted((pair for rank_batches in every for pair in rank_batches), key=lambda pair: pair[0])
    merged = np.concatenate([batch for _, batch in ordered])
    assert len(merged) == count, "every batch is rendered exactly once"
    return merged


def _to_uint8(images: torch.Tensor, size: int, antialias: bool = False) -> np.ndarray:
    """Images in [0, 1] [B, C, H, W] -> uint8 [B, size, size, C], resized before quantising as the
    paper does (scripts/dream_ood.py:547: bilinear, no antialiasing; it then truncates to uint8
    where ncis rounds)."""
    if images.shape[-1] != size:
        images = F.interpolate(images.float(), size=(size, size), mode="bilinear", antialias=antialias).clamp(0, 1)
    return (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)


def outlier_rows(
    pool_size: int, classes: int, images_per_class: int, images_per_embedding: int, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """(class, pool index) of every image to render, in groups of images_per_embedding images that
    share one outlier embedding. images_per_class = 0 renders every embedding of the pool, in order;
    otherwise each group's embedding is drawn at random with replacement from its class's pool, as
    the paper's sampler does (NCIS ldm/modules/encoders/modules.py:290), seeded per class. (Taking
    the first ones would render only the lowest-density embeddings of the first sampling round.)"""
    if not images_per_class:
        per_class = pool_size * images_per_embedding
        picks = np.tile(np.arange(per_class) // images_per_embedding, classes)
        return np.repeat(np.arange(classes), per_class), picks
    groups = -(-images_per_class // images_per_embedding)
    picks = [
        np.repeat(np.random.default_rng([seed, c]).integers(pool_size, size=groups), images_per_embedding)[:images_per_class]
        for c in range(classes)
    ]
    return np.repeat(np.arange(classes), images_per_class), np.concatenate(picks)


def preview_grid(real: list[np.ndarray], fake: list[np.ndarray], path, cell: int = 32) -> None:
    """Per class one row: real ID images on the left, generated outliers on the right."""
    rows = []
    for real_images, fake_images in zip(real, fake):
        rows.extend(list(real_images) + list(fake_images))
    tensor = torch.from_numpy(np.stack(rows)).permute(0, 3, 1, 2).float() / 255
    tensor = torch.nn.functional.interpolate(tensor, size=(cell, cell), mode="nearest")
    save_image(make_grid(tensor, nrow=len(real[0]) + len(fake[0]), padding=2, pad_value=0.5), path)


def _work_key(params: Params, layout) -> str:
    """Saved batches are reused only by the same work: settings, device, model, outlier pool and
    the inverted embeddings (the control pool's)."""
    settings = {
        "synthesize": params.synthesize.model_dump(exclude={"preview_per_class"}),
        "compile": params.compile,
        "device": resolve_device(params.device).type,  # a GPU's images differ from the CPU's in the last bits
    }
    return model_work_key(params, params.synthesize.dtype, settings, {"outliers": layout.outliers.parent, "embeddings": layout.embed_dir})


def main(params: Params) -> dict:
    settings = params.synthesize
    layout = layout_for(params)
    benchmark = get_benchmark(params.benchmark)
    outliers = load_outliers(layout.outliers, benchmark.num_classes)  # [C, M, D]
    pipe = load_for_params(params, resolve_device(params.device), settings.dtype)
    pipe.unet = compiled(pipe.unet, params.compile)
    width = token_embedding_table(pipe).embedding_dim
    if outliers.shape[2] != width:
        raise UserError(
            f"{layout.outliers} holds outliers of dimension {outliers.shape[2]}, the diffusion model's tokens have {width}; "
            "were they sampled from another model's embeddings? rerun `ncis embed` and `ncis sample` with this diffusion.model"
        )
    classes, per_pool = outliers.shape[:2]
    labels, picks = outlier_rows(per_pool, classes, settings.images_per_class, settings.images_per_embedding, params.seed)
    per_class = len(labels) // classes
    vectors = outliers[labels, picks]

    # Rendered batches are kept until the images are written, and a stopped run of the same
    # work resumes them (under torchrun rank 0 claims the folder before any rank reads it).
    batches = layout.synthesize_batches
    if distributed.is_main():
        claim(batches, _work_key(params, layout))
    distributed.barrier()
    images = render(pipe, params, benchmark, labels, vectors, np.arange(len(labels)), "synthesize: outliers", batches / "outliers")

    # Control: the class's own inverted embeddings, each with the starting noise of one outlier
    # of its class, so the pair differs only by the embedding.
    embedded = load_arrays(layout.embeddings)
    rng = np.random.default_rng(params.seed)
    control_count = min(settings.control_per_class, per_class)
    paired = np.concatenate([np.arange(c * per_class, c * per_class + control_count) for c in range(classes)])
    control_labels = labels[paired]
    members = [np.flatnonzero(embedded["labels"] == c) for c in range(classes)]
    control_vectors = embedded["embeddings"][[rng.choice(members[c]) for c in control_labels]] if len(paired) else vectors[:0]
    control = render(pipe, params, benchmark, control_labels, control_vectors, paired, "synthesize: control", batches / "control")
    if not distributed.is_main():
        return {}  # rank 0 has every image: it writes and logs

    side = min(settings.save_size, 32)
    id_images, id_labels = load_images(layout.id_train, benchmark.channels, side, limit=DIAGNOSTIC_IMAGES, seed=params.seed)
    small = lambda x: _to_uint8(torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255, side, antialias=True)  # noqa: E731
    small_images, small_control = small(images), small(control)
    classifier = diagnostics.fit_pixel_classifier(id_images, id_labels, params.seed)
    report = {
        "outlier_in_class_fraction": diagnostics.in_class_fraction(classifier, small_images, labels),
        "control_in_class_fraction": diagnostics.in_class_fraction(classifier, small_control, control_labels),
        "outlier_mahalanobis_ratio": diagnostics.mahalanobis_ratio(embedded["embeddings"], embedded["labels"], outliers),
        "outlier_diversity": diagnostics.pairwise_diversity(images, labels),
        "control_diversity": diagnostics.pairwise_diversity(control, control_labels),
        "paired_outlier_control_distance": float(np.sqrt((((images[paired] / 255.0) - (control / 255.0)) ** 2).sum((1, 2, 3))).mean())
        if len(paired)
        else float("nan"),
        **{f"outlier_{k}": v for k, v in diagnostics.statistics_shift(id_images, small_images).items()},
        **{f"control_{k}": v for k, v in diagnostics.statistics_shift(id_images, small_control).items()},
        "images": int(len(images)),
    }

    # JSON has no NaN: a diagnostic that cannot be computed (e.g. no control pool) is null.
    report = {key: None if isinstance(value, float) and not np.isfinite(value) else value for key, value in report.items()}
    with atomic_path(layout.synth_dir) as folder:
        folder.mkdir()
        write_image_folder(folder / layout.synthetic_images.name, images, labels)
        real = [id_images[id_labels == c][: settings.preview_per_class] for c in range(classes)]
        fake = [small_images[labels == c][: settings.preview_per_class] for c in range(classes)]
        preview_grid(real, fake, folder / layout.preview.name)
        write_json(folder / "diagnostics.json", report)
    shutil.rmtree(batches, ignore_errors=True)  # the images are written: nothing left to resume
    tracking.log_summary({f"synthesize/{k}": v for k, v in report.items()})  # also on the pipeline run
    tracking.log_artifact(layout.preview)
    tracking.log_artifact(layout.synth_dir / "diagnostics.json")
    print(
        f"synthesize: {len(images)} outlier images in {layout.synthetic_images}; classified as their prompted class "
        f"{report['outlier_in_class_fraction']:.0%} (control {report['control_in_class_fraction'] or float('nan'):.0%})"
    )
    return report
