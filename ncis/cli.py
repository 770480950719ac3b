"""`ncis` console script: one subcommand per pipeline stage, plus `run` (all of them),
`import-classifier` (the paper's released classifiers; ncis/import_classifier.py), `compare`,
`publish` and `ui` (the MLflow UI on the runs table; ncis/ui.py).

A thin layer: parse arguments, load and validate params once, call the stage's `main`.
"""

from __future__ import annotations

import argparse
import os
import sys

from ncis import distributed, publish, ui
from ncis.errors import UserError, one_line, unexpected
from ncis.lock import exclusive_outputs
from ncis.pipeline import STAGES
from ncis.signals import exit_code, interrupted_message, stop_signal, stop_signals_interrupt


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
    parser.add_argument(
        "--run-name", default=None, metavar="NAME", help="MLflow run name (default: benchmark, outliers, head, seed, changed params)"
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback of an error")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ncis",
        description="NCIS: synthetic outliers from low-density class-token embeddings, for OOD detection.",
    )
    sub = parser.add_subparsers(dest="command", metavar="<stage>", required=True)
    for name, (_, help_text) in STAGES.items():
        _add_common(sub.add_parser(name, help=help_text, description=help_text))
    imported = sub.add_parser(
        "import-classifier",
        help="the paper's released classifier checkpoint as this benchmark's classifier (then `ncis evaluate`)",
        description="Convert one of the paper's released ResNet-34 checkpoints (a .pt state dict) into the classifier "
        "folder under outputs, with the paper's input normalisation; not a pipeline stage (docs/reproducing.md).",
    )
    imported.add_argument("checkpoint", metavar="CHECKPOINT", help="the .pt file (read with torch.load(weights_only=True))")
    _add_common(imported)
    run = sub.add_parser("run", help="run every stage in order", description="run every stage in order")
    _add_common(run)
    run.add_argument(
        "--from", dest="first_stage", default="prepare", choices=list(STAGES), metavar="STAGE",
        help="start at STAGE, on what the earlier stages left (go on after a stopped run: its stage resumes)",
    )
    compare = sub.add_parser("compare", help="table of tracked pipeline runs: names, differing params, metrics")
    compare.add_argument("--experiment", default=None, help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else digits)")
    compare.add_argument("--runs", nargs="*", default=None, metavar="RUN_ID", help="run ids (default: latest per parameter set)")
    compare.add_argument("--all", action="store_true", help="every finished run, not only the latest per parameter set")
    compare.add_argument("--sort", default="auroc/average", metavar="COLUMN", help="metric or param to sort by, best first")
    compare.add_argument("--format", default="table", choices=["table", "csv", "markdown"], help="output format")
    publish_parser = sub.add_parser("publish", help="push the outputs dvc.lock records to a DVC remote (docs/dvc.md)")
    publish.add_arguments(publish_parser)
    ui_parser = sub.add_parser(
        "ui", help="start the MLflow UI on the tracking store, opened on the runs table sorted by average AUROC",
        description="Start `mlflow ui` on the store every stage logs to, wait until it answers, and print (and open, "
        "where there is a display) the benchmark's runs table; Ctrl-C stops it (docs/tracking.md).",
    )
    ui.add_arguments(ui_parser)
    for parser_ in (compare, publish_parser, ui_parser):
        parser_.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    return parser


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


def _baseline(params_file):
    """The params file as written, for naming what a run changed; None when it is valid only with
    the run's overrides (the name then lists no changed keys)."""
    from ncis.config import load_params

    try:
        return load_params(params_file)
    except UserError:
        return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    restore_signals = stop_signals_interrupt()  # SIGTERM/SIGHUP stop a run like Ctrl-C
    try:
        if args.command == "compare":
            from ncis.compare import compare

            compare(args.experiment, args.runs, sort=args.sort, output=args.format, every_run=args.all)
            return 0
        if args.command == "publish":
            publish.main(args)
            return 0
        if args.command == "ui":
            ui.main(args)
            return 0
        from ncis.config import load_params

        # Under torchrun only rank 0 logs to MLflow; the other ranks' runs are the no-op Run.
        helper_rank = distributed.launched() and int(os.environ.get("RANK", "0")) != 0
        overrides = list(args.overrides) + (["tracking.enabled=false"] if args.no_tracking or helper_rank else [])
        params = load_params(args.params, overrides)
        from ncis import tracking
        from ncis.pipeline import run_pipeline, run_stage

        run_name = args.run_name or tracking.run_name(params, baseline=_baseline(args.params))
        command = "ncis " + " ".join(sys.argv[1:] if argv is None else argv)
        # One job per outputs folder (under torchrun: rank 0 holds the lock for all its ranks);
        # what a killed one left half-written is swept first.
        with distributed.session(params.device, params.process_group_timeout_minutes), distributed.held_by_main(lambda: exclusive_outputs(params.outputs, command=command)):
            if args.command == "run":
                run_pipeline(params, run_name, args.first_stage)
            elif args.command == "import-classifier":
                from ncis import import_classifier

                import_classifier.run(params, args.checkpoint, args.run_name)
            else:
                run_stage(args.command, params, run_name)
        return 0
    except UserError as err:
        if args.debug:
            raise
        print(f"ncis: error: {one_line(err)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as err:
        print(interrupted_message(err, pipeline=args.command == "run"), file=sys.stderr)
        return exit_code(err)
    except Exception as err:
        if stop_signal(err):  # e.g. a DataLoader worker killed by the same SIGTERM failed first
            print(interrupted_message(err, pipeline=args.command == "run"), file=sys.stderr)
            return exit_code(err)
        if args.debug:
            raise
        print(f"ncis: error: {unexpected(err)}", file=sys.stderr)
        return 1
    finally:
        restore_signals()


if __name__ == "__main__":
    sys.exit(main())
