"""Stage `prepare`: the benchmark's datasets on disk; for digits also its tiny diffusion model."""

from __future__ import annotations

import json
import shutil

from ncis import tracking
from ncis.config import Params
from ncis.datasets import get_benchmark, load_images
from ncis.io import atomic_path
from ncis.layout import layout_for
from ncis.runtime import seed_everything


def main(params: Params) -> None:
    benchmark = get_benchmark(params.benchmark)
    layout = layout_for(params)
    seed_everything(params.seed)
    benchmark.prepare_data(params, layout)
    print(f"prepare: {benchmark.name} datasets written to {layout.data}")

    if benchmark.default_diffusion == "tiny" and not params.diffusion.model:
        from ncis.tiny_diffusion import train_tiny_model

        images, labels = load_images(layout.id_train, channels=benchmark.channels)
        with atomic_path(layout.tiny_diffusion) as folder:
            stats = train_tiny_model(params, images, labels, list(benchmark.class_names), folder, layout.diffusion_checkpoints)
            (folder / "training.json").write_text(json.dumps(stats, indent=2) + "\n")
        shutil.rmtree(layout.diffusion_checkpoints, ignore_errors=True)  # the model is saved: nothing left to resume
        tracking.log_metrics({"diffusion/final_loss": stats["final_loss"], "diffusion/parameters": stats["parameters"]})
        tracking.log_artifact(layout.tiny_diffusion, "diffusion")
        print(f"prepare: tiny diffusion model ({stats['parameters']:,} parameters) saved to {layout.tiny_diffusion}")
