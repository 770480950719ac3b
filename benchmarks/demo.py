"""`make demo`: the whole pipeline, then what its synthetic outliers bought.

1. Every stage, exactly as `ncis run` (params.yaml, or --params / --set), into `<outputs>/`.
2. The baseline: the same classifier trained without outliers (`classifier.outliers=none`, every
   other setting the same): `train-classifier` and `evaluate` into `<outputs>/baseline/`, which
   reads the pipeline's `<outputs>/data` through a link.
3. Both side by side, per OOD set, per group and on average (test sets; the validation average
   beside them): printed, written to `<outputs>/comparison.txt` and logged to MLflow.

In MLflow: two pipeline runs named as `ncis run` names them (`digits-cvpn-monotone-seed0` with
its seven stage runs, `digits-none-monotone-seed0` with `train-classifier` and `evaluate`), so
`ncis compare` and the UI list both; then a `<name>/demo` run (tag `ncis.stage=demo`) carrying
every evaluation metric of both classifiers as `ncis/<metric name>` and `no_outliers/<metric
name>` (the evaluate run's names: `auroc/letters`, `auroc/average`, `auroc/val_average`,
`id_accuracy`, ...) and the table as the artifact `comparison.txt`.

    python benchmarks/demo.py [--params FILE] [--set section.key=value ...] [--no-tracking]
"""

from __future__ import annotations

import argparse
import json
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
    """Rows: the classifier without outliers, the NCIS one; columns: each test set, each group,
    the average, and the validation average. AUROC, then FPR95, in %."""
    columns = [
        *((name, lambda m, name=name: m["ood"][name]) for name in ncis["ood"]),
        *((group, lambda m, group=group: m["groups"][group]) for group in ncis["groups"]),
        ("average", lambda m: m["average"]),
    ]
    if "validation" in ncis and "validation" in baseline:
        columns.append(("val avg", lambda m: m["validation"]["average"]))
    rows = (("no outliers", baseline), ("NCIS", ncis))
    header = f"{'':<14}" + "".join(f"{name[:COLUMN - 1]:>{COLUMN}}" for name, _ in columns)
    lines = [
        f"What the synthetic outliers bought: the same classifier (score {ncis['score']}) trained without "
        "them, then with them. Test OOD sets, their groups and average; 'val avg': the validation sets' average.",
    ]
    for metric, better in (("auroc", "higher"), ("fpr95", "lower")):
        lines += ["", f"{metric.upper()} (%, {better} is better)", header]
        lines += [f"{label:<14}" + "".join(f"{100 * pick(m)[metric]:>{COLUMN}.1f}" for _, pick in columns) for label, m in rows]
    lines += ["", "ID accuracy (%): " + ", ".join(f"{label} {100 * m['id_accuracy']:.1f}" for label, m in rows)]
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
