"""Score every classifier of a `benchmarks/results.py` run with each post-hoc OOD score.

For each finished run folder (`<outputs>/<variant>-<head>-seed<s>`), `evaluate` runs once per
score in a sibling folder that links the run's data and classifier, so the run's own
metrics.json is left as it was. Prints mean ± std over seeds of the validation sets' average
FPR95 / AUROC (to choose a score on), then the test sets' average, per group and per set (to report).

    python benchmarks/scores.py [--outputs outputs/results] [--scores energy msp mahalanobis knn]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from results import mean_std, validation_mean_std

from ncis.config import load_params
from ncis.pipeline import stage_function

RUN = re.compile(r"^(?P<variant>\w+)-(?P<head>\w+)-seed(?P<seed>\d+)$")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", default="outputs/results")
    parser.add_argument("--scores", nargs="+", default=["energy", "msp", "mahalanobis", "knn"])
    args = parser.parse_args()
    root = Path(args.outputs)
    table: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for run in sorted(p for p in root.iterdir() if RUN.match(p.name) and (p / "classifier").exists()):
        match = RUN.match(run.name)
        for score in args.scores:
            out = root / "scores" / f"{run.name}-{score}"
            out.mkdir(parents=True, exist_ok=True)
            for name in ("data", "classifier"):
                if not (out / name).exists():
                    (out / name).symlink_to((run / name).resolve(), target_is_directory=True)
            params = load_params(overrides=["tracking.enabled=false", f"outputs={out}", f"evaluate.score={score}", f"seed={match['seed']}"])
            if not (out / "metrics.json").exists():
                stage_function("evaluate")(params)
            table[(match["variant"], match["head"], score)].append(json.loads((out / "metrics.json").read_text()))

    print("\n" + score_table(table))


def score_table(table: dict[tuple[str, str, str], list[dict]]) -> str:
    first = next(iter(table.values()))[0]
    sets, groups = list(first["ood"]), list(first["groups"])
    header = (
        "| outliers | head | score | val FPR95 ↓ | val AUROC ↑ | FPR95 ↓ | AUROC ↑ | "
        + " | ".join([*(f"AUROC {g}" for g in groups), *(f"AUROC {s}" for s in sets)])
        + " |"
    )
    lines = [header, "|" + " --- |" * (header.count("|") - 1)]
    for (variant, head, score), reports in table.items():
        cells = [
            variant,
            head,
            score,
            validation_mean_std(reports, "fpr95"),
            validation_mean_std(reports, "auroc"),
            mean_std([r["average"]["fpr95"] for r in reports]),
            mean_std([r["average"]["auroc"] for r in reports]),
            *[mean_std([r["groups"][g]["auroc"] for r in reports]) for g in groups],
            *[mean_std([r["ood"][s]["auroc"] for r in reports]) for s in sets],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
