"""The benchmark scripts' bookkeeping: a finished run is reused only with the settings it ran with."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import results  # noqa: E402
import study  # noqa: E402

from ncis.config import load_params  # noqa: E402


def finished_run(out: Path, overrides: list[str]) -> None:
    """A run folder as results.variant_run leaves it, without running any stage."""
    settings = load_params(overrides=[*overrides, f"outputs={out}"]).model_dump(exclude={"outputs"})
    assert not results.own_folder(out, settings)
    (out / "metrics.json").write_text(json.dumps({"average": {"auroc": 0.6}}))


def test_a_finished_run_is_reused_with_its_settings_and_refused_with_others(tmp_path):
    overrides = ["tracking.enabled=false", "classifier.outliers=none", "seed=1"]
    out = tmp_path / "none-free-seed1"
    finished_run(out, overrides)
    report = results.variant_run(tmp_path / "base", out, overrides, "none", None)
    assert report["average"]["auroc"] == 0.6
    with pytest.raises(SystemExit, match="holds work made with other settings"):
        results.variant_run(tmp_path / "base", out, [*overrides, "classifier.epochs=3"], "none", None)


def test_mean_std_formats_spread_and_never_prints_negative_zero():
    assert results.mean_std([0.5, 0.7]) == "60.0 ± 14.1"
    assert results.mean_std([-0.0004, 0.0001], percent=True) == "0.0 ± 0.0"
    assert results.mean_std([1.234], percent=False, digits=2) == "1.23 ± 0.00"


def test_every_study_setting_is_a_valid_params_override_and_has_its_own_folder():
    for sweep in study.SWEEPS.values():
        assert () in sweep.settings, f"{sweep.name} has no reference row"
        names = [study.folder_name(s) for s in sweep.settings if s]
        assert len(set(names)) == len(names)
        for setting in sweep.settings:
            load_params(overrides=list(setting))  # raises UserError on a typo
