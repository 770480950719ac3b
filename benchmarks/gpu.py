"""Every GPU measurement of ncis in one run (under 5 minutes on one H200), printed as a table.

1. embed: ncis's batched inversion against the paper code's per-image procedure (embed_speed.py)
   at Stable Diffusion 1.4's shapes, with achieved TFLOP/s (FlopCounterMode on one step).
2. synthesize: images/s and peak memory per batch size at SD shapes (PLMS, CFG, VAE decoder).
3. train-cvpn: optimisation steps/s at the paper's cVPN size (768-d embeddings, 100 classes).
4. train-classifier: images/s of the paper's ResNet-34 on CIFAR-sized images, float32 against
   bfloat16 autocast + channels_last.
Utilisation is achieved TFLOP/s over the device's dense bfloat16 peak (--peak-tflops).

    python benchmarks/gpu.py                 # one H200 (random weights: nothing is downloaded)
    OMP_NUM_THREADS=2 python benchmarks/gpu.py --quick   # tiny shapes on a CPU: checks the script
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from embed_speed import parser as embed_parser
from embed_speed import measure as measure_embed
from sd_shapes import sd14_shapes, tiny_sd_shapes, to_device
from torch.utils.flop_counter import FlopCounterMode

from ncis.classifiers import build_classifier
from ncis.config import load_params
from ncis.datasets import get_benchmark
from ncis.diffusion import encode_text, generate, initial_latents, tokenize_prompts
from ncis.runtime import item_generator, resolve_device
from ncis.train_cvpn import fit_cvpn

ROOT = Path(__file__).resolve().parents[1]
H200_BF16_DENSE_TFLOPS = 989.0  # NVIDIA H200 SXM datasheet, dense (without sparsity)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def flops_of(work) -> float:
    with FlopCounterMode(display=False) as counter:
        work()
    return float(counter.get_total_flops())


def embed_rows(args, device) -> list[dict]:
    common = ["--device", str(device), "--rounds", "1", "--steps", "3", "--noise-draws", "32" if not args.quick else "4"]
    # SD at 512 with 32 draws keeps ~100 GB of float32 activations per image without checkpointing.
    shapes = ["--sd-shapes", "--gradient-checkpointing"] if not args.quick else ["--tiny-sd", "--gradient-checkpointing"]
    sizes = [(4, 1, 2), (8, 4, 2)] if not args.quick else [(4, 4, 2)]
    rows = []
    for images, batch, reference in sizes:
        try:
            rows.append(embed_row(common, shapes, images, batch, reference, device))
        except torch.cuda.OutOfMemoryError:
            rows.append({"measurement": f"embed batch {batch}", "ncis items/s": "out of memory"})
            torch.cuda.empty_cache()
    return rows


def embed_row(common, shapes, images, batch, reference, device) -> dict:
    result = measure_embed(
        embed_parser().parse_args([*common, *shapes, "--images", str(images), "--batch-size", str(batch), "--reference-images", str(reference)])
    )
    # FLOPs of one image's inversion: one step counted, times the steps.
    one = embed_parser().parse_args([*common, *shapes, "--images", "1", "--batch-size", "1", "--reference-images", "1", "--steps", "1"])
    per_image = flops_of(lambda: measure_embed(one, warm_up=False, reference=False)) * 3
    return {
        "measurement": f"embed batch {batch} (fp32, checkpointed)",
        "ncis items/s": result["ncis_images_per_s"],
        "reference items/s": result["reference_images_per_s"],
        "ratio": result["speedup"],
        "TFLOP/s": per_image * result["ncis_images_per_s"] / 1e12,
        "peak GiB": peak_gib(device),
    }


def peak_gib(device: torch.device) -> float:
    if device.type != "cuda":
        return float("nan")
    value = torch.cuda.max_memory_allocated() / 2**30
    torch.cuda.reset_peak_memory_stats()
    return value


def synthesize_rows(args, device) -> list[dict]:
    params = load_params(ROOT / "configs" / "cifar100.yaml")
    cfg = params.synthesize
    steps = cfg.steps if not args.quick else 2
    names = list(get_benchmark("digits").class_names)
    dtype = torch.float16 if device.type == "cuda" else torch.float32  # synthesize.dtype auto
    pipe = to_device((sd14_shapes if not args.quick else tiny_sd_shapes)(names), device, dtype)

    def render(count: int):
        ids, positions = tokenize_prompts(pipe, cfg.prompt, [names[i % 10] for i in range(count)])
        vectors = pipe.text_encoder.get_input_embeddings().weight[ids[torch.arange(count), positions]].float().cpu()
        with torch.no_grad():
            embeds = encode_text(pipe, ids, positions, vectors)
        latents = initial_latents(pipe, [item_generator(0, i) for i in range(count)])
        return generate(pipe, embeds, steps, cfg.guidance_scale, latents, cfg.scheduler)

    per_image = flops_of(lambda: render(1))
    rows = []
    for batch in ([1, 8, 16, 32] if not args.quick else [1, 4]):
        try:
            render(batch)  # warm-up at this shape
            peak_gib(device)
            sync(device)
            start = time.perf_counter()
            render(batch)
            sync(device)
        except torch.cuda.OutOfMemoryError:
            rows.append({"measurement": f"synthesize batch {batch}", "ncis items/s": "out of memory"})
            torch.cuda.empty_cache()
            continue
        rate = batch / (time.perf_counter() - start)
        rows.append({"measurement": f"synthesize batch {batch} ({steps} steps)", "ncis items/s": rate, "TFLOP/s": per_image * rate / 1e12, "peak GiB": peak_gib(device)})
    return rows


def cvpn_rows(args, device) -> list[dict]:
    params = load_params(ROOT / "configs" / "cifar100.yaml")
    dim, classes, points = (768, 100, 12800) if not args.quick else (16, 10, 640)
    config = params.cvpn.model_copy(update={"epochs": 2, "hidden": 4 * dim // 2 if not args.quick else 32, "class_embedding": 2 * dim if not args.quick else 16})
    rng = np.random.default_rng(0)
    embeddings = rng.normal(size=(points, dim)).astype(np.float32)
    labels = np.arange(points) % classes
    sync(device)
    start = time.perf_counter()
    fit_cvpn(embeddings, labels, classes, config, num_invariants=max(1, dim // 20), device=device, progress=False)
    sync(device)
    steps = config.epochs * -(-points // config.batch_size)
    return [{"measurement": f"train-cvpn D={dim} batch {config.batch_size}", "ncis items/s": steps / (time.perf_counter() - start), "unit": "steps/s"}]


def classifier_rows(args, device) -> list[dict]:
    arch, batch, side, classes = ("resnet34", 256, 32, 100) if not args.quick else ("small_cnn", 32, 8, 10)
    rows = []
    for precision in ("float32", "bfloat16"):
        model = build_classifier(arch, classes, 3 if not args.quick else 1, [0.5] * (3 if not args.quick else 1), [0.25] * (3 if not args.quick else 1)).to(device)
        images = torch.rand(batch, 3 if not args.quick else 1, side, side, device=device)
        labels = torch.randint(0, classes, (batch,), device=device)
        if device.type == "cuda":
            model, images = model.to(memory_format=torch.channels_last), images.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)

        def step():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bfloat16"):
                loss = torch.nn.functional.cross_entropy(model(images).float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()

        per_batch = flops_of(step)
        repeats = 20 if not args.quick else 3
        step()
        sync(device)
        start = time.perf_counter()
        for _ in range(repeats):
            step()
        sync(device)
        rate = repeats * batch / (time.perf_counter() - start)
        rows.append({"measurement": f"train-classifier {arch} {precision}", "ncis items/s": rate, "TFLOP/s": per_batch / batch * rate / 1e12, "peak GiB": peak_gib(device)})
    return rows


def table(rows: list[dict], peak_tflops: float) -> str:
    columns = ["measurement", "ncis items/s", "reference items/s", "ratio", "TFLOP/s", "% of bf16 peak", "peak GiB"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        if "TFLOP/s" in row:
            row["% of bf16 peak"] = 100 * row["TFLOP/s"] / peak_tflops
        cells = [row.get(c) for c in columns]
        lines.append("| " + " | ".join("" if v is None else f"{v:.3g}" if isinstance(v, float) else str(v) for v in cells) + " |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes on any device, to check the script")
    p.add_argument("--device", default="auto")
    p.add_argument("--peak-tflops", type=float, default=H200_BF16_DENSE_TFLOPS, help="device's dense bf16 peak (default: H200)")
    p.add_argument("--only", nargs="*", default=["embed", "synthesize", "cvpn", "classifier"])
    args = p.parse_args()
    device = resolve_device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = False  # float32 stays float32, as in ncis's stages
    sections = {"embed": embed_rows, "synthesize": synthesize_rows, "cvpn": cvpn_rows, "classifier": classifier_rows}
    rows, started = [], time.perf_counter()
    for name in args.only:
        begun = time.perf_counter()
        rows += sections[name](args, device)
        print(f"{name}: {time.perf_counter() - begun:.0f} s", flush=True)
    name = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({torch.get_num_threads()} threads)"
    print(f"\n{name}, torch {torch.__version__}, {time.perf_counter() - started:.0f} s in all\n")
    print(table(rows, args.peak_tflops))


if __name__ == "__main__":
    main()
