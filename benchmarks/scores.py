"""Score every classifier of a `benchmarks/results.py` run with each post-hoc OOD score.

For each finished run folder (`<outputs>/<variant>-<head>-seed<s>`), `evaluate` runs once per
score in a sibling folder that links the run's data and classifier, so the run's own
metrics.json is left as it was. Prints mean ± std over seeds of the validation sets' average
FPR95 / AUROC (to choose a score on), then the test sets' average, per group and per set (to report).

    python benchmarks/scores.py [--outputs outputs/results] [--scores energy msp mahalanobis knn] [--heads monotone]
"""

from __future__ import annotations

import argparse
import json
import re
from collections import defaultdict
from pathlib import Path

from results import VARIANTS, metric_table

from ncis.config import load_params
from ncis.pipeline import stage_function

RUN = re.compile(r"^(?P<variant>\w+)-(?P<head>\w+)-seed(?P<seed>\d+)$")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--outputs", default="outputs/results")
    parser.add_argument("--scores", nargs="+", default=["energy", "msp", "mahalanobis", "knn"])
    parser.add_argument("--heads", nargs="+", default=["free", "monotone"], help="the energy heads whose runs to score")
    args = parser.parse_args()
    root = Path(args.outputs)
    runs = [
        (p, m) for p in root.iterdir()
        if (m := RUN.match(p.name)) and (p / "classifier").exists() and m["head"] in args.heads and m["variant"] in VARIANTS
    ]
    # Rows in results.py's order (variant, then head), as the README table has them.
    runs.sort(key=lambda r: (list(VARIANTS).index(r[1]["variant"]), args.heads.index(r[1]["head"]), int(r[1]["seed"])))
    table: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for run, match in runs:
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
    return metric_table(["outliers", "head", "score"], table)


if __name__ == "__main__":
    main()
