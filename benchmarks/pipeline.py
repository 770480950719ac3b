"""Time every stage of `ncis run` on digits and check the tiny model's quality bar.

Budgets (issues): prepare < 240 s, embed / train-cvpn / sample < 120 s each, the whole
pipeline < 600 s and < 4 GiB peak memory, all on 2 CPU cores; generated digits classified as the prompted class
>= 90% of the time (sampled at guidance 3). Prints a Markdown table of seconds and budget ratios (ratio < 1 = within
budget) measured in this one run; paste it into BENCHMARKS.md.

    python benchmarks/pipeline.py [--set section.key=value ...]
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import time

import numpy as np
import torch

from ncis.pipeline import STAGES, stage_function
from ncis.config import load_params
from ncis.datasets import get_benchmark, load_images
from ncis.diagnostics import fit_pixel_classifier, in_class_fraction
from ncis.diffusion import encode_text, generate, initial_latents, load_pipeline, tokenize_prompts
from ncis.layout import layout_for

BUDGET_S = {"prepare": 240, "embed": 120, "train-cvpn": 120, "sample": 120}
PIPELINE_BUDGET_S = 600
MEMORY_BUDGET_GIB = 4.0
QUALITY_BAR = 0.90
# The bar measures the model, so it samples with guidance 3, where the model follows its prompt;
# synthesize's digits default (1) draws less typical digits on purpose (docs/digits-study.md).
QUALITY_GUIDANCE = 3.0


def tiny_model_quality(params, per_class: int = 20) -> float:
    layout = layout_for(params)
    names = list(get_benchmark(params.benchmark).class_names)
    pipe = load_pipeline(layout.tiny_diffusion)
    labels = np.repeat(np.arange(len(names)), per_class)
    ids, _ = tokenize_prompts(pipe, params.synthesize.prompt, [names[c] for c in labels])
    latents = initial_latents(pipe, [torch.Generator().manual_seed(10_000 + i) for i in range(len(labels))])
    images = generate(pipe, encode_text(pipe, ids), params.synthesize.steps, QUALITY_GUIDANCE, latents, params.synthesize.scheduler)
    pixels = (images.permute(0, 2, 3, 1).numpy() * 255).round().astype(np.uint8)
    train_x, train_y = load_images(layout.id_train, channels=1)
    return in_class_fraction(fit_pixel_classifier(train_x, train_y), pixels, labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    args = parser.parse_args()
    params = load_params(overrides=["outputs=outputs/benchmark", "tracking.enabled=false", *args.overrides])
    rows, total = [], 0.0
    for name in STAGES:
        start = time.perf_counter()
        stage_function(name)(params)
        seconds = time.perf_counter() - start
        total += seconds
        budget = BUDGET_S.get(name)
        rows.append((name, seconds, f"{seconds / budget:.2f}" if budget else ""))
    peak_gib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux; every stage ran in this process
    quality = tiny_model_quality(params)

    print(f"\nMachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, torch threads {torch.get_num_threads()}")
    print("\n| stage | seconds | ratio to budget |\n| --- | ---: | ---: |")
    for name, seconds, ratio in rows:
        print(f"| {name} | {seconds:.1f} | {ratio} |")
    print(f"| **pipeline** | **{total:.1f}** | **{total / PIPELINE_BUDGET_S:.2f}** |")
    print(f"\nPeak memory (max RSS of the process that ran every stage): {peak_gib:.2f} GiB (budget {MEMORY_BUDGET_GIB:g} GiB: "
          f"ratio {peak_gib / MEMORY_BUDGET_GIB:.2f})")
    print(f"\nTiny model: generated digits (guidance {QUALITY_GUIDANCE:g}) classified as the prompted class {quality:.1%} (bar {QUALITY_BAR:.0%}: "
          f"ratio {quality / QUALITY_BAR:.2f})")


if __name__ == "__main__":
    main()
