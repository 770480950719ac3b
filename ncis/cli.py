"""`ncis` console script: one subcommand per pipeline stage, plus `run` (all of them).

A thin layer: parse arguments, load and validate params once, call the stage's `main`.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from ncis.errors import UserError

# stage name -> (module, one-line description). Order is pipeline order.
STAGES: dict[str, tuple[str, str]] = {
    "prepare": ("ncis.prepare", "materialise the benchmark's datasets (digits: also train the tiny diffusion model)"),
    "embed": ("ncis.embed", "textual inversion: one class-token embedding per training image"),
    "train-cvpn": ("ncis.train_cvpn", "train the conditional volume-preserving network on the embeddings"),
    "sample": ("ncis.sample", "draw low-density outlier embeddings per class"),
    "synthesize": ("ncis.synthesize", "generate outlier images from the outlier embeddings"),
    "train-classifier": ("ncis.train_classifier", "train the classifier with the energy regulariser on ID + outliers"),
    "evaluate": ("ncis.evaluate", "FPR95 / AUROC / AUPR and ID accuracy against the OOD test sets"),
}


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--params", default=None, metavar="FILE", help="parameter file (default: params.yaml)")
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one parameter, e.g. --set cvpn.lr=1e-3 (repeatable)",
    )
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow (same as --set tracking.enabled=false)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ncis",
        description="NCIS: synthetic outliers from low-density class-token embeddings, for OOD detection.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<stage>", required=True)
    for name, (_, help_text) in STAGES.items():
        _add_common(sub.add_parser(name, help=help_text, description=help_text))
    _add_common(sub.add_parser("run", help="run every stage in order", description="run every stage in order"))
    compare = sub.add_parser("compare", help="table of FPR95 / AUROC / ID accuracy of tracked runs")
    compare.add_argument("--experiment", default="digits", help="MLflow experiment (= benchmark name)")
    compare.add_argument("--runs", nargs="*", default=None, metavar="RUN_ID", help="run ids (default: latest per parameter set)")
    from ncis import publish

    publish.add_arguments(sub.add_parser("publish", help="push the outputs dvc.lock records to a DVC remote (docs/dvc.md)"))
    return parser


def stage_function(name: str):
    module_name, _ = STAGES[name]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            raise UserError(f"stage {name!r} is not implemented yet") from None
        raise
    return module.main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """`parse_args`, plus `--section.key VALUE` taken as `--set section.key=VALUE`: the form in which
    `mlflow run -P section.key=VALUE` passes a parameter its MLproject entry point does not declare."""
    from ncis.config import Params

    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    while rest:
        token = rest.pop(0)
        key, has_value, value = token.removeprefix("--").partition("=")
        if not token.startswith("--") or key.split(".")[0] not in Params.model_fields or not hasattr(args, "overrides"):
            parser.error(f"unrecognized arguments: {token}")
        if not has_value:
            if not rest:
                parser.error(f"argument {token}: expected a value")
            value = rest.pop(0)
        args.overrides.append(f"{key}={value}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        if args.command == "compare":
            from ncis.tracking import compare

            compare(args.experiment, args.runs)
            return 0
        if args.command == "publish":
            from ncis.publish import main as publish

            publish(args)
            return 0
        from ncis.config import load_params

        overrides = list(args.overrides) + (["tracking.enabled=false"] if args.no_tracking else [])
        params = load_params(args.params, overrides)
        from ncis.pipeline import run_pipeline, run_stage

        if args.command == "run":
            run_pipeline(params)
        else:
            run_stage(args.command, params)
        return 0
    except UserError as err:
        print(f"ncis: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("ncis: interrupted; finished work is kept and the stage resumes where it can", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
