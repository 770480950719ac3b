"""`ncis compare`: one row per tracked pipeline, with its name, the parameters that differ between
the rows, and its final metrics, from `mlflow.search_runs`.

A row is a finished top-level run that carries `auroc/average`: a pipeline run (`ncis run`,
`mlflow run`), or an `evaluate` run of its own (e.g. under `dvc repro`).
"""

from __future__ import annotations

import csv
import io
import os
from typing import Any

from ncis.errors import UserError
from ncis.config import PLACEMENT_KEYS
from ncis.tracking import PRIMARY_METRIC, check_server

METRICS = ("auroc/average", "fpr95/average", "aupr_in/average", "id_accuracy", "synthesize/outlier_in_class_fraction")
LOWER_IS_BETTER = ("fpr95", "synthesize/outlier_in_class_fraction", "synthesize/control_in_class_fraction")
FORMATS = ("table", "csv", "markdown")


def compare(
    experiment: str | None = None,
    runs: list[str] | None = None,
    sort: str = PRIMARY_METRIC,
    output: str = "table",
    every_run: bool = False,
) -> list[dict[str, Any]]:
    """Print the rows (`output`: table, csv or markdown), best `sort` first, and return them.

    `runs`: these run ids; by default the finished pipelines of `experiment` (default: as for
    runs, MLFLOW_EXPERIMENT_NAME, else digits), the latest per parameter set unless `every_run`.
    """
    import mlflow

    experiment = experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "digits"
    if output not in FORMATS:
        raise UserError(f"--format {output!r}: choose one of {', '.join(FORMATS)}")
    check_server(fix="or unset it to read MLflow's local default store")
    found = mlflow.get_experiment_by_name(experiment)
    if found is None:
        known = ", ".join(sorted(e.name for e in mlflow.search_experiments())) or "none"
        raise UserError(f"no MLflow experiment {experiment!r} at {_uri()} (experiments there: {known})")
    chosen = _chosen_runs(experiment, found.experiment_id, runs) if runs else _pipelines(found.experiment_id, every_run)
    if not chosen:
        raise UserError(f"no finished pipeline run in experiment {experiment!r} at {_uri()}; run `ncis run` first")
    rows = _rows(chosen)
    if sort not in rows[0]:
        raise UserError(f"--sort {sort!r}: not a column; choose one of {', '.join(rows[0])}")
    rows = _sorted(rows, sort)
    print(render(rows, output), end="")
    return rows


def _uri() -> str:
    import mlflow

    return mlflow.get_tracking_uri()


def _pipelines(experiment_id: str, every_run: bool) -> list:
    import mlflow

    found = mlflow.search_runs(
        [experiment_id],
        filter_string=(
            "attributes.status = 'FINISHED' and tags.mlflow.parentRunId IS NULL "
            f"and metrics.`{PRIMARY_METRIC}` >= 0"
        ),
        order_by=["attributes.start_time DESC"],
        output_format="list",
    )
    if every_run:
        return found
    latest = {}
    for run in found:  # newest first: the first of each parameter set wins
        key = tuple(sorted((k, v) for k, v in run.data.params.items() if k not in PLACEMENT_KEYS))
        latest.setdefault(key, run)
    return list(latest.values())


def _chosen_runs(experiment: str, experiment_id: str, run_ids: list[str]) -> list:
    import mlflow

    quoted = ", ".join(f"'{run_id}'" for run_id in run_ids if run_id.isalnum())
    found = mlflow.search_runs([experiment_id], f"attributes.run_id IN ({quoted})", output_format="list") if quoted else []
    by_id = {run.info.run_id: run for run in found}
    missing = [run_id for run_id in run_ids if run_id not in by_id]
    if missing:
        raise UserError(
            f"run {missing[0]!r} not found in experiment {experiment!r} at {_uri()}; copy run ids from the MLflow UI"
        )
    return [by_id[run_id] for run_id in dict.fromkeys(run_ids)]


def _rows(runs: list) -> list[dict[str, Any]]:
    keys = sorted({k for run in runs for k in run.data.params} - PLACEMENT_KEYS)
    differing = [k for k in keys if len({run.data.params.get(k) for run in runs}) > 1]
    rows = []
    for run in runs:
        row = {"name": run.info.run_name}
        row.update({k: run.data.params.get(k, "") for k in differing})
        row.update({m: run.data.metrics.get(m) for m in METRICS})
        row["run_id"] = run.info.run_id
        rows.append(row)
    return rows


def _sorted(rows: list[dict[str, Any]], column: str) -> list[dict[str, Any]]:
    """Best first: metrics by their direction, anything else ascending; missing values last."""
    if column not in METRICS:
        return sorted(rows, key=lambda row: (row[column] in (None, ""), _number_or_text(row[column])))
    sign = 1 if column.startswith(LOWER_IS_BETTER) else -1
    return sorted(rows, key=lambda row: (row[column] is None, sign * (row[column] or 0.0)))


def _number_or_text(value) -> tuple:
    try:
        return (0, float(value), "")
    except (TypeError, ValueError):
        return (1, 0.0, str(value))


def render(rows: list[dict[str, Any]], output: str = "table") -> str:
    columns = list(rows[0])
    cells = [[_cell(value) for value in row.values()] for row in rows]
    if output == "csv":
        buffer = io.StringIO()
        csv.writer(buffer, lineterminator="\n").writerows([columns, *cells])
        return buffer.getvalue()
    if output == "markdown":
        lines = [columns, ["---"] * len(columns), *cells]
        return "".join("| " + " | ".join(c.replace("|", "\\|") for c in line) + " |\n" for line in lines)
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(columns)]
    return "".join("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() + "\n" for r in [columns, *cells])


def _cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4f}" if isinstance(value, float) else str(value)
