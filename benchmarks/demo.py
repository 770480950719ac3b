"""`make demo`: the whole pipeline, then what its synthetic outliers bought.

1. Every stage, exactly as `ncis run` (params.yaml, or --params / --set), into `<outputs>/`.
2. The baseline: the same classifier trained without outliers (`classifier.outliers=none`, every
   other setting the same): `train-classifier` and `evaluate` into `<outputs>/baseline/`, which
   reads the pipeline's `<outputs>/data` through a link.
3. Both side by side, per OOD set, per group and on average (test sets; the validation average
   beside them): printed, written to `<outputs>/comparison.txt` and logged to MLflow.

In MLflow the whole demo is one `demo` run (tag `ncis.stage=demo`) holding the pipeline run and
the baseline run (with its `train-classifier` and `evaluate` runs); the `demo` run itself carries
every evaluation metric of both classifiers as `ncis/<name>` and `no_outliers/<name>`, where
`<name>` is the evaluate run's metric name (`auroc/letters`, `auroc/average`, `auroc/val_average`,
`id_accuracy`, ...), and the table as the artifact `comparison.txt`.

    python benchmarks/demo.py [--params FILE] [--set section.key=value ...] [--no-tracking]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ncis import tracking
from ncis.config import load_params
from ncis.errors import UserError
from ncis.evaluate import validation_metrics
from ncis.io import atomic_path
from ncis.layout import layout_for
from ncis.metrics import METRIC_NAMES
from ncis.pipeline import run_pipeline, stage_function

BASELINE = "baseline"  # subfolder of the outputs folder, and MLflow run name
COLUMN = 9


def load_both(params_file: str | None, overrides: list[str]):
    """The pipeline's params, and the baseline's: the same but no outliers and `<outputs>/baseline`."""
    params = load_params(params_file, overrides)
    if params.classifier.outliers == "none":
        raise UserError("classifier.outliers is none: the demo compares outliers against none; set ncis or noise")
    baseline = load_params(params_file, [*overrides, f"outputs={Path(params.outputs) / BASELINE}", "classifier.outliers=none"])
    return params, baseline


def run_baseline(params, baseline) -> dict:
    """`train-classifier` and `evaluate` of the baseline, on the pipeline's data; its metrics."""
    data, linked = layout_for(params).data, layout_for(baseline).data
    linked.parent.mkdir(parents=True, exist_ok=True)
    if not linked.is_symlink():
        linked.symlink_to(Path("..") / data.name, target_is_directory=True)
    with tracking.stage_run(baseline, BASELINE):
        for name in ("train-classifier", "evaluate"):
            with tracking.stage_run(baseline, name):
                stage_function(name)(baseline)
    return read_metrics(layout_for(baseline).metrics)


def read_metrics(path: Path) -> dict:
    if not path.is_file():
        raise UserError(f"{path} is missing; the evaluate stage did not finish")
    return json.loads(path.read_text())


def mlflow_metrics(metrics: dict) -> dict[str, float]:
    """Every number of one metrics.json under the evaluate run's MLflow names."""
    groups = {f"{m}/average_{group}": entry[m] for group, entry in metrics["groups"].items() for m in METRIC_NAMES}
    return {**tracking.evaluation_metrics(metrics), **groups, **validation_metrics(metrics)}


def comparison_metrics(ncis: dict, baseline: dict) -> dict[str, float]:
    """`ncis/<name>` and `no_outliers/<name>` for every evaluation metric of both classifiers."""
    return {
        **{f"ncis/{name}": value for name, value in mlflow_metrics(ncis).items()},
        **{f"no_outliers/{name}": value for name, value in mlflow_metrics(baseline).items()},
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--params", default=None, metavar="FILE", help="parameter file (default: params.yaml)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    args = parser.parse_args(argv)
    try:
        params, baseline = load_both(args.params, [*args.overrides, *(["tracking.enabled=false"] if args.no_tracking else [])])
        with tracking.stage_run(params, "demo"):
            # 1. the pipeline, as `ncis run`
            run_pipeline(params)
            ncis_metrics = read_metrics(layout_for(params).metrics)
            # 2. the same classifier without outliers
            baseline_metrics = run_baseline(params, baseline)
            # 3. side by side
            table = comparison_table(ncis_metrics, baseline_metrics)
            path = Path(params.outputs) / "comparison.txt"
            with atomic_path(path) as tmp:
                tmp.write_text(table + "\n")
            tracking.log_metrics(comparison_metrics(ncis_metrics, baseline_metrics))
            tracking.log_artifact(path)
        print("\n" + table)
        return 0
    except UserError as err:
        print(f"demo: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
