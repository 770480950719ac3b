"""`make demo`: the whole pipeline, then what its synthetic outliers bought.

1. Every stage, exactly as `ncis run` (params.yaml, or --params / --set), into `<outputs>/`.
2. The baseline: the same classifier trained without outliers (`classifier.outliers=none`, every
   other setting the same): `train-classifier` and `evaluate` into `<outputs>/baseline/`, which
   reads the pipeline's `<outputs>/data` through a link.
3. Both side by side, per OOD set, per group (near, far, stats) and on average (test sets; then the
   validation average and groups), each row's difference beside it and every loss marked: printed,
   written to `<outputs>/comparison.txt` and logged to MLflow.

In MLflow: two pipeline runs named as `ncis run` names them (`digits-cvpn-monotone-seed0` with
its seven stage runs, `digits-none-monotone-seed0` with `train-classifier` and `evaluate`), so
`ncis compare` and the UI list both; then a `<name>/demo` run (tag `ncis.stage=demo`) carrying
every evaluation metric of both classifiers as `ncis/<metric name>` and `no_outliers/<metric
name>` (the evaluate run's names: `auroc/letters`, `auroc/average`, `auroc/val_average`,
`id_accuracy`, ...) and the table as the artifact `comparison.txt`. It ends with the command that
opens them in the MLflow UI, on the runs table (`ncis ui`).

    python benchmarks/demo.py [--params FILE] [--set section.key=value ...] [--no-tracking]
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from pathlib import Path

from ncis import tracking
from ncis.config import load_params
from ncis.errors import UserError, one_line
from ncis.io import atomic_path
from ncis.layout import layout_for
from ncis.lock import exclusive_outputs
from ncis.pipeline import run_pipeline, stage_function
from ncis.signals import exit_code, in_stage, interrupted_message, stop_signals_interrupt

BASELINE = "baseline"  # subfolder of the outputs folder
BASELINE_STAGES = ("train-classifier", "evaluate")
COLUMN = 9


def load_both(params_file: str | None, overrides: list[str]):
    """The pipeline's params, and the baseline's: the same but no outliers and `<outputs>/baseline`."""
    params = load_params(params_file, overrides)
    if params.classifier.outliers == "none":
        raise UserError("classifier.outliers is none: the demo compares outliers against none; set ncis or noise")
    baseline = load_params(params_file, [*overrides, f"outputs={Path(params.outputs) / BASELINE}", "classifier.outliers=none"])
    return params, baseline


def run_name(params, params_file: str | None) -> str:
    """The name `ncis run` gives these params (what differs from the params file as written)."""
    try:
        written = load_params(params_file)
    except UserError:
        written = None
    return tracking.run_name(params, baseline=written)


def run_baseline(params, baseline, name: str) -> dict:
    """`train-classifier` and `evaluate` of the baseline, on the pipeline's data; its metrics."""
    data, linked = layout_for(params).data, layout_for(baseline).data
    linked.parent.mkdir(parents=True, exist_ok=True)
    if not linked.is_symlink():
        linked.symlink_to(Path("..") / data.name, target_is_directory=True)
    with tracking.pipeline_run(baseline, name):
        for stage in BASELINE_STAGES:
            with tracking.stage_run(baseline, stage), in_stage(stage):
                stage_function(stage)(baseline)
    return read_metrics(layout_for(baseline).metrics)


def read_metrics(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} is missing; the evaluate stage did not finish")
    return json.loads(path.read_text())


def comparison_metrics(ncis: dict, baseline: dict) -> dict[str, float]:
    """`ncis/<name>` and `no_outliers/<name>` for every evaluation metric of both classifiers."""
    return {
        **{f"ncis/{name}": value for name, value in tracking.evaluation_metrics(ncis).items()},
        **{f"no_outliers/{name}": value for name, value in tracking.evaluation_metrics(baseline).items()},
    }


def comparison_table(ncis: dict, baseline: dict) -> str:
    """One row per test OOD set, per group, the average, then the validation average and groups;
    columns: AUROC without outliers, with them and the difference, then the same for FPR95 (in %).
    A row where the outliers lose AUROC is marked, so that a loss reads as plainly as a gain."""
    rows = [(name, entry["group"], lambda m, name=name: m["ood"][name]) for name, entry in ncis["ood"].items()]
    rows += [(f"{group} average", "", lambda m, group=group: m["groups"][group]) for group in ncis["groups"]]
    rows.append(("average", "", lambda m: m["average"]))
    if "validation" in ncis and "validation" in baseline:
        rows.append(("val average", "", lambda m: m["validation"]["average"]))
        rows += [(f"val {group}", "", lambda m, group=group: m["validation"]["groups"][group]) for group in ncis["validation"]["groups"]]

    def cells(metric: str, pick) -> str:
        before, after = 100 * pick(baseline)[metric], 100 * pick(ncis)[metric]
        return f"{before:>{COLUMN}.1f}{after:>{COLUMN}.1f}{after - before:>+{COLUMN}.1f}"

    width = max(len(label) for label, _, _ in rows) + 2
    lines = [
        f"What the synthetic outliers bought: the same classifier (score {ncis['score']}) trained without them "
        "('none'), then with them ('NCIS'). Test OOD sets, their groups and average; then the validation sets'.",
        "",
        f"{'':<{width + 7}}{'AUROC % (higher is better)':<{3 * COLUMN + 2}}FPR95 % (lower is better)",
        f"{'OOD set':<{width}}{'group':<7}" + "".join(f"{h:>{COLUMN}}" for h in ("none", "NCIS", "Δ")) + "  "
        + "".join(f"{h:>{COLUMN}}" for h in ("none", "NCIS", "Δ")),
    ]
    for label, group, pick in rows:
        lost = pick(ncis)["auroc"] < pick(baseline)["auroc"]
        lines.append(f"{label:<{width}}{group:<7}{cells('auroc', pick)}  {cells('fpr95', pick)}" + ("  <- NCIS loses" if lost else ""))
    lines += ["", "ID accuracy (%): " + ", ".join(f"{label} {100 * m['id_accuracy']:.1f}" for label, m in (("none", baseline), ("NCIS", ncis)))]
    return "\n".join(lines)


def demo(params, baseline, params_file: str | None) -> str:
    """The three steps; returns the table."""
    name = run_name(params, params_file)
    # 1. the pipeline, as `ncis run` (its own top-level run, which `ncis compare` lists)
    run_pipeline(params, name)
    ncis_metrics = read_metrics(layout_for(params).metrics)
    # 2. the same classifier without outliers (a second pipeline run)
    baseline_metrics = run_baseline(params, baseline, run_name(baseline, params_file))
    # 3. side by side
    table = comparison_table(ncis_metrics, baseline_metrics)
    path = Path(params.outputs) / "comparison.txt"
    with atomic_path(path) as tmp:
        tmp.write_text(table + "\n")
    with tracking.stage_run(params, "demo", name):
        tracking.log_metrics(comparison_metrics(ncis_metrics, baseline_metrics))
        tracking.log_artifact(path)
    return table


def ui_command(params_file: str | None) -> str:
    """`ncis ui` as this interpreter's environment holds it (`.venv/bin/ncis ui` after `make demo`)."""
    script = Path(sys.executable).with_name("ncis")
    relative = os.path.relpath(script)
    command = (script if relative.startswith("..") else relative) if script.is_file() else "ncis"
    return shlex.join([str(command), "ui", *(["--params", params_file] if params_file else [])])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=None, metavar="FILE", help="parameter file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    args = parser.parse_args(argv)
    restore_signals = stop_signals_interrupt()  # SIGTERM/SIGHUP stop it like Ctrl-C, as `ncis run`
    try:
        params, baseline = load_both(args.params, [*args.overrides, *(["tracking.enabled=false"] if args.no_tracking else [])])
        # One process per outputs folder (the baseline's lies inside it), as `ncis run`.
        with exclusive_outputs(params.outputs, command="benchmarks/demo.py " + " ".join(sys.argv[1:] if argv is None else argv)):
            table = demo(params, baseline, args.params)
        print("\n" + table)
        if params.tracking.enabled:
            print(f"\nBoth pipelines in the MLflow UI, sorted by average AUROC: {ui_command(args.params)}")
        return 0
    except UserError as err:
        print(f"demo: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(interrupted_message(err), file=sys.stderr)
        return exit_code(err)
    finally:
        restore_signals()


if __name__ == "__main__":
    sys.exit(main())
