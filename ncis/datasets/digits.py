"""The embedded default benchmark: scikit-learn's bundled 8x8 digits, OOD sets from bundled assets."""

from __future__ import annotations

from ncis.datasets import Benchmark, register


def prepare_data(params, layout) -> None:
    raise NotImplementedError("digits data preparation is being written")


DIGITS = register(
    Benchmark(
        name="digits",
        class_names=("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
        image_size=8,
        channels=1,
        ood_sets={"letters": "near", "photos": "far", "textures": "far", "noise": "far"},
        prepare_data=prepare_data,
        default_diffusion="tiny",
    )
)
