"""The benchmark scripts' bookkeeping: a finished run is reused only with the settings it ran with."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import blind_spot  # noqa: E402
import results  # noqa: E402
import study  # noqa: E402

from ncis.config import load_params  # noqa: E402


def claimed_run(out: Path, overrides: list[str]) -> None:
    """A run folder as results.variant_run claims it before running its stages."""
    assert not results.own_folder(out, results.run_settings(load_params(overrides=[*overrides, f"outputs={out}"])))


def finished_run(out: Path, overrides: list[str]) -> None:
    """A run folder as results.variant_run leaves it, without running any stage."""
    claimed_run(out, overrides)
    (out / "metrics.json").write_text(json.dumps({"average": {"auroc": 0.6}}))


def test_a_finished_run_is_reused_with_its_settings_and_refused_with_others(tmp_path):
    overrides = ["tracking.enabled=false", "classifier.outliers=none", "seed=1"]
    out = tmp_path / "none-free-seed1"
    finished_run(out, overrides)
    report = results.variant_run(tmp_path / "base", out, overrides, "none", None)
    assert report["average"]["auroc"] == 0.6
    # Where and how it ran is no setting of the run: another device or timeout reuses it too.
    moved = [*overrides, "device=cpu", "process_group_timeout_minutes=5", "tracking.enabled=true"]
    assert results.variant_run(tmp_path / "base", out, moved, "none", None)["average"]["auroc"] == 0.6
    with pytest.raises(SystemExit, match="holds work made with other settings"):
        results.variant_run(tmp_path / "base", out, [*overrides, "classifier.epochs=3"], "none", None)


def test_a_run_folder_another_process_is_filling_is_refused_not_shared(tmp_path):
    from ncis.lock import outputs_lock

    overrides = ["tracking.enabled=false", "classifier.outliers=none", "seed=1"]
    out = tmp_path / "none-free-seed1"
    # Another script claimed the folder for the same run and is running its stages (e.g. a second
    # sweep with the same setting).
    claimed_run(out, overrides)
    with outputs_lock(out, command="benchmarks (train-classifier)"):
        with pytest.raises(SystemExit, match="in use by `benchmarks \\(train-classifier\\)`"):
            results.variant_run(tmp_path / "base", out, overrides, "none", None)
    assert not (out / "classifier").exists()


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


def report(test_auroc: float, val_auroc: float | None) -> dict:
    """A metrics.json with two test sets (one near, one far) and, unless None, a validation block."""
    entry = lambda auroc: {"fpr95": 1 - auroc, "auroc": auroc, "aupr_in": auroc, "aupr_out": auroc}  # noqa: E731
    metrics = {
        "id_accuracy": 0.99,
        "ood": {"letters": {"group": "near", **entry(test_auroc)}, "noise": {"group": "far", **entry(test_auroc)}},
        "average": entry(test_auroc),
        "groups": {"near": entry(test_auroc), "far": entry(test_auroc)},
    }
    if val_auroc is not None:
        metrics["validation"] = {"ood": {}, "average": entry(val_auroc), "groups": {}}
    return metrics


def test_tables_show_validation_columns_to_choose_on_before_test_columns():
    reports = {("none", "free"): [report(0.9, 0.5), report(0.9, 0.5)], ("cvpn", "free"): [report(0.6, 0.8), report(0.6, 0.8)]}
    header, _, none_row, cvpn_row = results.table(reports).splitlines()
    columns = [c.strip() for c in header.strip("|").split("|")]
    assert columns[2:8] == ["val FPR95 ↓", "val AUROC ↑", "FPR95 ↓", "AUROC ↑", "AUROC near", "AUROC far"]
    assert [c.strip() for c in cvpn_row.strip("|").split("|")][2:6] == ["20.0 ± 0.0", "80.0 ± 0.0", "40.0 ± 0.0", "60.0 ± 0.0"]
    # Chosen on validation, whatever the test sets say.
    assert results.best_on_validation(reports, " / ".join).startswith("Highest validation AUROC: cvpn / free (80.0)")
    # Runs made before validation sets existed show "–" and choose nothing.
    old = {("none", "free"): [report(0.9, None)]}
    assert "| – | – |" in results.table(old) and results.best_on_validation(old, str) == ""


def grouped(val_groups: dict[str, float]) -> dict:
    """A metrics.json whose validation block has these group AUROCs (the average is their mean)."""
    metrics = report(0.8, sum(val_groups.values()) / len(val_groups))
    metrics["validation"]["groups"] = {g: {"auroc": a} for g, a in val_groups.items()}
    return metrics


def test_a_row_that_loses_a_validation_group_to_no_outliers_is_not_chosen():
    reports = {
        ("none",): [grouped({"near": 0.8, "stats": 0.5})] * 2,
        ("sharp",): [grouped({"near": 0.95, "stats": 0.45}), grouped({"near": 0.95, "stats": 0.5})],  # best average, loses stats
        ("even",): [grouped({"near": 0.85, "stats": 0.55})] * 2,
    }
    choice = results.best_on_validation(reports, " / ".join, ("none",))
    assert choice.startswith("Highest validation AUROC: even (70.0), of the rows that lose no validation group to none")
    assert "Losing a group: sharp (stats -2.5)" in choice
    # Without a baseline the highest average wins, as before.
    assert results.best_on_validation(reports, " / ".join).startswith("Highest validation AUROC: sharp")
    # The groups are columns to choose on, beside the validation average.
    columns = [c.strip() for c in results.table({(k[0], "free"): v for k, v in reports.items()}).splitlines()[0].strip("|").split("|")]
    assert columns[2:6] == ["val FPR95 ↓", "val AUROC ↑", "val near", "val stats"]


def test_a_sweep_value_equal_to_the_reference_is_the_reference_row():
    head = load_params().classifier.energy_head
    assert study.same_as_reference((f"classifier.energy_head={head}",), [])
    other = "free" if head == "monotone" else "monotone"
    assert not study.same_as_reference((f"classifier.energy_head={other}",), [])
    assert study.same_as_reference((f"classifier.energy_head={other}",), [f"classifier.energy_head={other}"])
    assert not study.same_as_reference((), [])  # the reference itself is no duplicate


def test_sweep_tables_start_with_the_no_outlier_row_and_show_each_validation_group():
    def run(near: float, stats: float, outliers: bool = True) -> dict:
        metrics = grouped({"near": near, "stats": stats})
        if outliers:
            metrics |= {
                "embed": {"shift_from_class_token_mean": 0.12},
                "cvpn": {"num_invariants": 15, "reconstruction_vs_pca": 1.27},
                "diagnostics": {
                    "outlier_in_class_fraction": 0.86, "control_in_class_fraction": 0.96, "paired_outlier_control_distance": 1.2,
                    "outlier_mahalanobis_ratio": 1.7, "outlier_mean_level_auroc": 0.75,
                },
            }
        return metrics

    sweep = study.SWEEPS["guidance"]
    rows = {(): [run(0.9, 0.3)] * 2, ("synthesize.guidance_scale=1",): [run(0.9, 0.7)] * 2}
    lines = study.sweep_table(sweep, rows, [], [run(0.8, 0.5, outliers=False)] * 2).splitlines()
    header = [c.strip() for c in lines[0].strip("|").split("|")]
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:]]
    assert [row[0] for row in cells] == ["no outliers", study.reference_label(sweep, []), "guidance_scale 1"]
    column = dict(zip(header, zip(*cells)))
    assert column["val near"] == ("80.0 ± 0.0", "90.0 ± 0.0", "90.0 ± 0.0")
    assert column["val stats"] == ("50.0 ± 0.0", "30.0 ± 0.0", "70.0 ± 0.0")
    assert column["mean level AUROC"] == ("–", "75.0 ± 0.0", "75.0 ± 0.0")  # no outliers, no pool
    assert column["Δ val AUROC"] == ("–", "–", "20.0 ± 0.0")  # (0.9 + 0.7) / 2 - (0.9 + 0.3) / 2


def test_blind_spot_table_averages_seeds_and_shows_no_pool_as_a_dash():
    row = lambda energy, level: {"ID digits": energy, "faint": energy + 1, "outliers' mean-level AUROC": level, "stats AUROC": 0.5}  # noqa: E731
    lines = blind_spot.table({"no outliers": [row(8.0, float("nan"))] * 2, "guidance 7.5": [row(6.0, 0.7), row(7.0, 0.8)]}).splitlines()
    assert lines[0] == "| runs | E ID digits | E faint | outliers' mean-level AUROC | stats AUROC |"
    assert lines[2] == "| no outliers (2 seeds) | 8.00 | 9.00 | – | 50.0 |"
    assert lines[3] == "| guidance 7.5 (2 seeds) | 6.50 | 7.50 | 0.75 | 50.0 |"
