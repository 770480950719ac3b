"""The digits study: one knob at a time, what lets NCIS outliers leave their class.

Every setting of a sweep is NCIS (cVPN sampler, the params.yaml head) with that one change,
run with several seeds by the machinery of `results.py`; `--set` pins settings for every run
(the first study, before digits had validation sets, ran pinned at guidance 3 with the free head). A setting
reuses what its change does not touch: a sampler or guidance change reuses the reference
runs' diffusion model and embeddings, an inversion change re-embeds, a token-noise change
retrains the model (one model per setting, shared by its seeds).

Each sweep's table (mean ± std over seeds) starts with the same classifier trained without
outliers (runs in <outputs>/none), then shows the validation OOD sets' average AUROC and AUROC
per group first (`Benchmark.validation_ood_sets`: the columns a default is chosen on; named below
the table: the setting with the highest average of those that lose no validation group to the
no-outlier row), then the test sets' (reported, never chosen on). A setting
equal to the reference (e.g. guidance 7.5 when params.yaml says 7.5) is the reference row. The table
goes to <outputs>/<sweep>.md and, with --publish, between the `<!-- study:<sweep>:start/end -->`
markers of docs/digits-study.md.

    python benchmarks/study.py --publish                                       # every sweep, 3 seeds
    python benchmarks/study.py --sweeps guidance energy_head --seeds 0         # two sweeps, one seed
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

from results import (
    ROOT, SHARED, VARIANTS, best_on_validation, mean_std, prepare_base, validation_group_mean_std, validation_mean_std, variant_run,
    write_between_markers,
)

from ncis.config import load_params


@dataclass(frozen=True)
class Sweep:
    name: str
    question: str
    reuse: tuple[str, ...]  # base outputs a setting shares with the reference runs
    settings: tuple[tuple[str, ...], ...]  # overrides per setting; () is the reference


SWEEPS = {sweep.name: sweep for sweep in (
    Sweep(
        "inversion",
        "How far does textual inversion move the class token, and do stronger inversions carry outliers out of the class?",
        ("data", "diffusion"),
        ((), ("embed.steps=10", "embed.lr=0.05"), ("embed.noise_draws=32",)),
    ),
    Sweep(
        "token_noise",
        "Does noise on the class token while the tiny model trains make its conditioning space continuous?",
        (),  # prepare rewrites its data folder, so a linked one would be overwritten
        ((), ("diffusion.token_noise=0.02",), ("diffusion.token_noise=0.05",)),
    ),
    Sweep(
        "cvpn_epochs",
        "Is the cVPN converged, and does convergence change the outliers?",
        SHARED,
        ((), ("cvpn.epochs=600",)),
    ),
    Sweep(
        "sampler",
        "How extreme must the kept candidates be, and how many invariants?",
        SHARED,
        ((), ("sample.rounds=1", "sample.keep=100"), ("sample.candidates=33300",), ("cvpn.pca_variance_percent=20",)),
    ),
    Sweep(
        "guidance",
        "How strongly must generation follow the (outlier) prompt?",
        SHARED,
        (("synthesize.guidance_scale=1",), ("synthesize.guidance_scale=3",), (), ("synthesize.guidance_scale=7.5",)),
    ),
    Sweep(
        "energy_head",
        "Should the energy head be free to reverse, or monotone?",
        SHARED,
        ((), ("classifier.energy_head=free",), ("classifier.energy_head=monotone",)),
    ),
    Sweep(
        "energy_weight",
        "How much weight should the energy regulariser get against cross-entropy?",
        SHARED,
        ((), ("classifier.energy_weight=0.03",), ("classifier.energy_weight=0.3",), ("classifier.energy_weight=1.0",)),
    ),
    Sweep(
        "starting_noise",
        "The starting noise decides much of the image: does starting from the prior's tails help?",
        SHARED,
        ((), ("synthesize.noise_scale=1.5",)),
    ),
)}
OUTLIER_COLUMNS = ("in-class, outliers ↓", "in-class, control", "paired L2", "Mahalanobis ratio", "mean level AUROC")
BASELINE_LABEL = "no outliers"


def folder_name(overrides: tuple[str, ...]) -> str:
    return ",".join(o.split(".", 1)[1] for o in overrides)


def setting_label(overrides: tuple[str, ...]) -> str:
    return ", ".join(o.split(".", 1)[1].replace("=", " ") for o in overrides)


def reference_label(sweep: Sweep, pinned: list[str]) -> str:
    """The reference values of the keys the sweep varies, e.g. "guidance_scale 3.0 (reference)"."""
    params = load_params(overrides=pinned).model_dump()
    keys = dict.fromkeys(o.split("=", 1)[0] for setting in sweep.settings for o in setting)
    values = []
    for key in keys:
        section, name = key.split(".", 1)
        values.append(f"{name} {params[section][name]}")
    return ", ".join(values) + " (reference)"


def run_setting(sweep: Sweep, overrides: tuple[str, ...], seeds: list[int], outputs: Path, pinned: list[str]) -> list[dict]:
    """NCIS with `overrides` on top of `pinned`, one report per seed; the reference setting
    (no override) lives in <outputs>/reference and is shared by every sweep."""
    common = ["tracking.enabled=false", *pinned, *overrides]
    reference = outputs / "reference"
    root = outputs / sweep.name / folder_name(overrides) if overrides else reference
    base = prepare_base(root, common, None if root == reference else str(reference / "base"), list(sweep.reuse) if overrides else [])
    head = load_params(overrides=common).classifier.energy_head
    run_overrides = [*common, *VARIANTS["cvpn"]]
    return [
        variant_run(base, root / f"cvpn-{head}-seed{seed}", [*run_overrides, f"seed={seed}"], "cvpn", None) for seed in seeds
    ]


def run_baseline(seeds: list[int], outputs: Path, pinned: list[str]) -> list[dict]:
    """The same classifier without outliers, per seed, on the reference's data: the row no chosen
    setting may lose a validation group to (docs/digits-study.md, "Choosing on validation")."""
    common = ["tracking.enabled=false", *pinned]
    base = prepare_base(outputs / "reference", common, None, [])
    head = load_params(overrides=common).classifier.energy_head
    return [
        variant_run(base, outputs / "none" / f"none-{head}-seed{seed}", [*common, *VARIANTS["none"], f"seed={seed}"], "none", None)
        for seed in seeds
    ]


def same_as_reference(overrides: tuple[str, ...], pinned: list[str]) -> bool:
    """The setting changes nothing: its params equal the reference's (e.g. the default value)."""
    return bool(overrides) and load_params(overrides=[*pinned, *overrides]) == load_params(overrides=pinned)


def paired_delta(reports: list[dict], reference: list[dict], metric) -> str:
    """mean ± std over seeds of `metric(run) - metric(reference run of the same seed)`; "–" if undefined."""
    try:
        return mean_std([metric(r) - metric(ref) for r, ref in zip(reports, reference)])
    except KeyError:
        return "–"


def sweep_table(sweep: Sweep, rows: dict[tuple[str, ...], list[dict]], pinned: list[str], baseline: list[dict]) -> str:
    """The no-outlier row, then one row per setting. Δ is the difference to the reference run of the
    same seed: seeds share the classifier's initialisation and data order, which move AUROC more
    than most knobs. Validation columns (average, per group) to choose on, then test columns to report."""
    reference = rows[()]
    val_groups, groups = list(reference[0]["validation"]["groups"]), list(reference[0]["groups"])
    names = [
        "setting", "shift from token", "invariants", "cVPN rec. / PCA", *OUTLIER_COLUMNS,
        "val AUROC ↑", "Δ val AUROC", *(f"val {g}" for g in val_groups),  # to choose on
        "FPR95 ↓", "AUROC ↑", "Δ AUROC", *(f"AUROC {g}" for g in groups), "ID acc.",  # to report
    ]
    lines = ["| " + " | ".join(names) + " |", "|" + " --- |" * len(names)]
    for overrides, reports in {BASELINE_LABEL: baseline, **rows}.items():
        is_setting = overrides != BASELINE_LABEL
        diagnostics = [r.get("diagnostics", {}) for r in reports]

        def outliers(key, percent=True, digits=1):
            values = [d.get(key) for d in diagnostics]
            return mean_std(values, percent=percent, digits=digits) if is_setting and None not in values else "–"

        def delta(metric):
            return paired_delta(reports, reference, metric) if is_setting and overrides else "–"

        cells = [
            BASELINE_LABEL if not is_setting else setting_label(overrides) if overrides else reference_label(sweep, pinned),
            f"{reports[0]['embed']['shift_from_class_token_mean']:.2f}" if is_setting else "–",
            str(reports[0]["cvpn"]["num_invariants"]) if is_setting else "–",
            mean_std([r["cvpn"]["reconstruction_vs_pca"] for r in reports], percent=False, digits=2) if is_setting else "–",
            outliers("outlier_in_class_fraction"),
            outliers("control_in_class_fraction"),
            outliers("paired_outlier_control_distance", percent=False, digits=2),
            outliers("outlier_mahalanobis_ratio", percent=False, digits=2),
            outliers("outlier_mean_level_auroc"),
            validation_mean_std(reports, "auroc"),
            delta(lambda r: r["validation"]["average"]["auroc"]),
            *[validation_group_mean_std(reports, g) for g in val_groups],
            mean_std([r["average"]["fpr95"] for r in reports]),
            mean_std([r["average"]["auroc"] for r in reports]),
            delta(lambda r: r["average"]["auroc"]),
            *[mean_std([r["groups"][g]["auroc"] for r in reports]) for g in groups],
            mean_std([r["id_accuracy"] for r in reports]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", nargs="+", default=list(SWEEPS), choices=list(SWEEPS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--set", dest="pinned", action="append", default=[], help="section.key=value for every run")
    parser.add_argument("--outputs", default="outputs/study")
    parser.add_argument("--publish", action="store_true", help="write the tables into docs/digits-study.md")
    args = parser.parse_args()

    for name in args.sweeps:
        sweep = SWEEPS[name]
        settings = [o for o in sweep.settings if not same_as_reference(o, args.pinned)]
        rows = {o: run_setting(sweep, o, args.seeds, Path(args.outputs), args.pinned) for o in settings}
        baseline = run_baseline(args.seeds, Path(args.outputs), args.pinned)
        command = " ".join(["python benchmarks/study.py", f"--sweeps {name}", f"--seeds {' '.join(map(str, args.seeds))}", *[f"--set {o}" for o in args.pinned]])
        label = lambda o: BASELINE_LABEL if o == BASELINE_LABEL else setting_label(o) if o else reference_label(sweep, args.pinned)  # noqa: E731
        choice = best_on_validation({BASELINE_LABEL: baseline, **rows}, label, BASELINE_LABEL)
        text = (
            f"{sweep.question} `{command}` ({len(args.seeds)} seeds; mean ± std, % unless a ratio or distance):\n\n"
            f"{sweep_table(sweep, rows, args.pinned, baseline)}\n" + (f"\n{choice}" if choice else "")
        )
        print(f"\n## {name}\n\n{text}", flush=True)
        (Path(args.outputs) / name).mkdir(parents=True, exist_ok=True)
        (Path(args.outputs) / f"{name}.md").write_text(text)
        if args.publish:
            write_between_markers(ROOT / "docs" / "digits-study.md", f"study:{name}", text)


if __name__ == "__main__":
    main()
