"""benchmarks/embed_speed.py and benchmarks/gpu.py: the reference really is the same inversion, and the GPU script runs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import embed_speed  # noqa: E402


def test_the_reference_procedure_reaches_ncis_vectors():
    args = embed_speed.parser().parse_args(
        ["--device", "cpu", "--images", "3", "--batch-size", "3", "--noise-draws", "2", "--steps", "2", "--rounds", "1"]
    )
    result = embed_speed.measure(args)
    assert result["vector_shift"] > 1e-3  # the vectors moved ...
    assert result["max_vector_difference"] < 1e-5  # ... to the same place by both procedures
    assert result["ncis_images_per_s"] > 0 and result["reference_images_per_s"] > 0


@pytest.mark.slow
def test_gpu_script_runs_quick_on_a_cpu():
    done = subprocess.run([sys.executable, "benchmarks/gpu.py", "--quick", "--device", "cpu"], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for row in ("embed batch", "synthesize batch 4", "train-cvpn", "train-classifier small_cnn bfloat16"):
        assert row in done.stdout
