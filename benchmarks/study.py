"""The digits study: one knob at a time, what lets NCIS outliers leave their class.

Every setting of a sweep is NCIS as shipped (cVPN sampler, the params.yaml head) with that one
change, run with several seeds by the machinery of `results.py`. A setting reuses what its change
does not touch: a sampler or guidance change reuses the README table's diffusion model and
embeddings, an inversion change re-embeds, a token-noise change retrains the model (one model
per setting, shared by its seeds). The default setting is the README table's own runs.

Each sweep's table (mean ± std over seeds) goes to <outputs>/<sweep>.md and, with --publish,
between the `<!-- study:<sweep>:start/end -->` markers of docs/digits-study.md.

    python benchmarks/study.py --publish                      # every sweep, 3 seeds
    python benchmarks/study.py --sweeps guidance --seeds 0    # one sweep, one seed
"""

from __future__ import annotations

import argparse
import re
from dataclasses import dataclass
from pathlib import Path

from results import ROOT, SHARED, VARIANTS, mean_std, prepare_base, variant_run

from ncis.config import load_params


@dataclass(frozen=True)
class Sweep:
    question: str
    reuse: tuple[str, ...]  # base outputs a setting shares with the README table's runs
    settings: tuple[tuple[str, ...], ...]  # overrides per setting; () is the default


SWEEPS = {
    "inversion": Sweep(
        "How far does textual inversion move the class token, and do stronger inversions carry outliers out of the class?",
        ("data", "diffusion"),
        ((), ("embed.steps=10", "embed.lr=0.05"), ("embed.noise_draws=32",)),
    ),
    "token_noise": Sweep(
        "Does noise on the class token while the tiny model trains make its conditioning space continuous?",
        (),  # prepare rewrites its data folder, so a linked one would be overwritten
        ((), ("diffusion.token_noise=0.02",), ("diffusion.token_noise=0.05",)),
    ),
    "cvpn_epochs": Sweep(
        "Is the cVPN converged, and does convergence change the outliers?",
        SHARED,
        ((), ("cvpn.epochs=600",)),
    ),
    "sampler": Sweep(
        "How extreme must the kept candidates be, and how many invariants?",
        SHARED,
        ((), ("sample.rounds=1", "sample.keep=100"), ("sample.candidates=33300",), ("cvpn.pca_variance_percent=20",)),
    ),
    "guidance": Sweep(
        "How strongly must generation follow the (outlier) prompt?",
        SHARED,
        (("synthesize.guidance_scale=1",), (), ("synthesize.guidance_scale=7.5",)),
    ),
    "starting_noise": Sweep(
        "The starting noise decides much of the image: does starting from the prior's tails help?",
        SHARED,
        ((), ("synthesize.noise_scale=1.5",)),
    ),
}
COLUMNS = ("in-class, outliers ↓", "in-class, control", "paired L2", "Mahalanobis ratio", "FPR95 ↓", "AUROC ↑", "AUROC letters", "ID acc.")


def folder_name(overrides: tuple[str, ...]) -> str:
    return ",".join(o.split(".", 1)[1] for o in overrides)


def setting_label(overrides: tuple[str, ...]) -> str:
    return ", ".join(o.split(".", 1)[1].replace("=", " ") for o in overrides) or "default"


def run_setting(sweep: Sweep, overrides: tuple[str, ...], seeds: list[int], outputs: Path, reference: Path) -> list[dict]:
    """NCIS with `overrides`, one report per seed; the default setting lives in `reference`."""
    common = ["tracking.enabled=false", *overrides]
    root = outputs / folder_name(overrides) if overrides else reference
    base = prepare_base(root, common, None if root == reference else str(reference / "base"), list(sweep.reuse) if overrides else [])
    head = load_params(overrides=common).classifier.energy_head
    run_overrides = [*common, *VARIANTS["cvpn"]]
    return [
        variant_run(base, root / f"cvpn-{head}-seed{seed}", [*run_overrides, f"seed={seed}"], "cvpn", None) for seed in seeds
    ]


def sweep_table(sweep: Sweep, rows: dict[tuple[str, ...], list[dict]]) -> str:
    lines = [
        "| setting | shift from token | invariants | cVPN rec. / PCA | " + " | ".join(COLUMNS) + " |",
        "|" + " --- |" * (len(COLUMNS) + 4),
    ]
    for overrides, reports in rows.items():
        diagnostics = [r["diagnostics"] for r in reports]
        cells = [
            setting_label(overrides),
            f"{reports[0]['embed']['shift_from_class_token_mean']:.2f}",
            str(reports[0]["cvpn"]["num_invariants"]),
            mean_std([r["cvpn"]["reconstruction_vs_pca"] for r in reports], percent=False, digits=2),
            mean_std([d["outlier_in_class_fraction"] for d in diagnostics]),
            mean_std([d["control_in_class_fraction"] for d in diagnostics]),
            mean_std([d["paired_outlier_control_distance"] for d in diagnostics], percent=False, digits=2),
            mean_std([d["outlier_mahalanobis_ratio"] for d in diagnostics], percent=False, digits=2),
            mean_std([r["average"]["fpr95"] for r in reports]),
            mean_std([r["average"]["auroc"] for r in reports]),
            mean_std([r["ood"]["letters"]["auroc"] for r in reports]),
            mean_std([r["id_accuracy"] for r in reports]),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def publish(name: str, text: str, doc: Path) -> None:
    content = doc.read_text()
    marker = re.compile(rf"(<!-- study:{name}:start -->\n).*?(<!-- study:{name}:end -->)", flags=re.S)
    if not marker.search(content):
        raise SystemExit(f"{doc}: no <!-- study:{name}:start/end --> markers; add them where the table belongs")
    doc.write_text(marker.sub(lambda m: m.group(1) + text + m.group(2), content))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sweeps", nargs="+", default=list(SWEEPS), choices=list(SWEEPS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--outputs", default="outputs/study")
    parser.add_argument("--reference", default="outputs/results", help="the README table's runs (results.py --outputs)")
    parser.add_argument("--publish", action="store_true", help="write the tables into docs/digits-study.md")
    args = parser.parse_args()

    for name in args.sweeps:
        sweep = SWEEPS[name]
        rows = {o: run_setting(sweep, o, args.seeds, Path(args.outputs) / name, Path(args.reference)) for o in sweep.settings}
        command = f"python benchmarks/study.py --sweeps {name} --seeds {' '.join(map(str, args.seeds))}"
        text = f"{sweep.question} `{command}` ({len(args.seeds)} seeds; mean ± std, % unless a ratio or distance):\n\n{sweep_table(sweep, rows)}\n"
        print(f"\n## {name}\n\n{text}", flush=True)
        (Path(args.outputs) / name).mkdir(parents=True, exist_ok=True)
        (Path(args.outputs) / f"{name}.md").write_text(text)
        if args.publish:
            publish(name, text, ROOT / "docs" / "digits-study.md")


if __name__ == "__main__":
    main()
