"""Regenerate the README's digits results table: OOD detection with each outlier source.

One shared `prepare` + `embed` (the tiny diffusion model and the embeddings are fixed), then
for every seed and variant the later stages (`train-cvpn` where needed, `sample`,
`synthesize`, `train-classifier`, `evaluate`) run with `seed=<s>`; the table reports mean ± std
over seeds, as measured: first the validation OOD sets' average FPR95 / AUROC and AUROC per
group (the columns to choose on: `Benchmark.validation_ood_sets`), then the test sets' average
FPR95 / AUROC, per group and per set, and ID accuracy (the columns to report). Below the table,
the row with the highest validation AUROC of those that lose no validation group to `none`. The table goes to <outputs>/results.md; with --readme also to
docs/results.md and between the README's results markers. When no variant needs synthetic
images (`none`, `noise`), the shared base holds only the data: no tiny model, no embeddings.

    python benchmarks/results.py --readme               # none, cvpn, linear, knn; 3 seeds
    python benchmarks/results.py --variants none cvpn linear knn noise --heads free monotone
    python benchmarks/results.py --set classifier.epochs=10   # any params.yaml override for all runs

A run folder that already holds a metrics.json is reused when its params.json matches the run's
settings (every key but the placement ones, `config.PLACEMENT_KEYS`: where a run happens does
not change it), so an interrupted sweep resumes; one that ran with other settings stops the script.
After changing code, delete the folder or pick another --outputs.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from pathlib import Path

import numpy as np

from ncis.config import is_placement, load_params
from ncis.datasets import get_benchmark
from ncis.errors import UserError
from ncis.layout import layout_for
from ncis.lock import exclusive_outputs
from ncis.pipeline import stage_function
from ncis.resume import claim, work_key

ROOT = Path(__file__).resolve().parent.parent
# variant -> overrides; "none" and "noise" need no synthetic images.
VARIANTS = {
    "none": ["classifier.outliers=none"],
    "noise": ["classifier.outliers=noise"],
    "cvpn": ["sample.method=cvpn", "classifier.outliers=ncis"],
    "linear": ["sample.method=linear", "classifier.outliers=ncis"],
    "knn": ["sample.method=knn", "classifier.outliers=ncis"],
}
SHARED = ("data", "diffusion", "embed")  # outputs every run reuses from the base run
SYNTHETIC = ("cvpn", "linear", "knn")  # variants whose outliers the tiny model draws


def run(stages: list[str], params) -> None:
    """The stages in this process, holding the run folder's outputs lock as `ncis` does: a second
    script on the same folder (e.g. two sweeps sharing a setting) is refused, not interleaved."""
    try:
        with exclusive_outputs(params.outputs, command=f"benchmarks ({', '.join(stages)})"):
            for name in stages:
                started = time.perf_counter()
                stage_function(name)(params)
                print(f"[results] {name} done in {time.perf_counter() - started:.0f} s", flush=True)
    except UserError as err:
        raise SystemExit(f"[results] {err}") from None


def link(source: Path, out: Path, names) -> None:
    for name in names:
        if (source / name).exists() and not (out / name).exists():
            (out / name).symlink_to((source / name).resolve(), target_is_directory=True)


def variant_run(base: Path, out: Path, overrides: list[str], variant: str, outliers_from: Path | None) -> dict:
    """Run one variant; `outliers_from` is a finished run of the same variant and seed whose
    outliers (cVPN, samples, images) are reused, e.g. when only the energy head differs."""
    params = load_params(overrides=[*overrides, f"outputs={out}"])
    settings = run_settings(params)
    if own_folder(out, settings) and (out / "metrics.json").exists():
        print(f"[results] {out} already done with these settings; reusing it", flush=True)
        return read_report(out)
    link(base, out, SHARED)
    stages = ["train-classifier", "evaluate"]
    if variant in SYNTHETIC:
        if outliers_from is not None:
            link(outliers_from, out, ("cvpn", "sample", "synthesize"))
        else:
            stages = (["train-cvpn"] if variant == "cvpn" else []) + ["sample", "synthesize", *stages]
    run(stages, params)
    return read_report(out)


def run_settings(params) -> dict:
    """What a finished run is reused by: every setting but where and how it ran (`is_placement`)."""
    return {key: value for key, value in params.flat().items() if not is_placement(key)}


def own_folder(out: Path, settings: dict) -> bool:
    """Claim `out` for a run with `settings` (True: it already holds that run's work). A folder of
    another run is refused, never overwritten; params.json beside it says what it was made with."""
    try:
        reused = claim(out, work_key(settings), discard_other=False)
    except UserError as err:
        raise SystemExit(f"{err} (see its params.json)") from None
    (out / "params.json").write_text(json.dumps(settings, indent=1))
    return reused


def read_report(out: Path) -> dict:
    """metrics.json of a finished run, with the outlier-pool and cVPN diagnostics when it has them."""
    report = json.loads((out / "metrics.json").read_text())
    for key, path in (("diagnostics", out / "synthesize" / "diagnostics.json"), ("cvpn", out / "cvpn" / "config.json"), ("embed", out / "embed" / "summary.json")):
        if path.exists():
            report[key] = json.loads(path.read_text())
    return report


def prepare_base(root: Path, common: list[str], base_from: str | None, reuse: list[str], generator: bool = True) -> Path:
    """<root>/base: the data, diffusion model and embeddings every run of `root` shares; what
    `base_from` provides (`reuse`) is linked, the rest computed. `generator` False: the data alone
    (enough for the `none` and `noise` variants), without training the tiny model."""
    base = root / "base"
    base_params = load_params(overrides=[*common, f"outputs={base}"])
    own_folder(base, base_params.model_dump(include={"benchmark", "seed", "data", "diffusion", "embed"}))
    if base_from:
        link(Path(base_from), base, reuse)
    if not generator:
        if not (base / "data").exists():
            # The data part of `prepare` alone: the same function, the same files.
            get_benchmark(base_params.benchmark).prepare_data(base_params, layout_for(base_params))
        return base
    if not (base / "diffusion" / "model_index.json").exists():
        run(["prepare"], base_params)
    if not (base / "embed" / "embeddings.npz").exists():
        run(["embed"], base_params)
    return base


def write_between_markers(doc: Path, name: str, text: str) -> None:
    """Replace what lies between `<!-- name:start -->` and `<!-- name:end -->` in `doc`."""
    marker = re.compile(rf"(<!-- {name}:start -->\n).*?(<!-- {name}:end -->)", flags=re.S)
    content = doc.read_text()
    if not marker.search(content):
        raise SystemExit(f"{doc}: no <!-- {name}:start/end --> markers; add them where the table belongs")
    doc.write_text(marker.sub(lambda m: m.group(1) + text + m.group(2), content))


def mean_std(values: list[float], percent: bool = True, digits: int = 1) -> str:
    scale = 100 if percent else 1
    values = np.asarray(values, dtype=float) * scale
    spread = values.std(ddof=1) if len(values) > 1 else 0.0
    mean = round(float(values.mean()), digits) + 0.0  # + 0.0 turns a rounded -0.0 into 0.0
    return f"{mean:.{digits}f} ± {spread:.{digits}f}"


def validation_group_mean_std(runs: list[dict], group: str) -> str:
    """mean ± std of one validation group's average AUROC; "–" for runs made without it."""
    if not all(group in r.get("validation", {}).get("groups", {}) for r in runs):
        return "–"
    return mean_std([r["validation"]["groups"][group]["auroc"] for r in runs])


def validation_mean_std(runs: list[dict], metric: str) -> str:
    """mean ± std of the validation average of `metric`; "–" for runs made without validation sets."""
    if not all("validation" in r for r in runs):
        return "–"
    return mean_std([r["validation"]["average"][metric] for r in runs])


def metric_table(labels: list[str], rows: dict[tuple, list[dict]], extra: dict[str, object] | None = None) -> str:
    """Markdown: per row its `labels` cells, the validation columns (to choose on: average and per
    group), the test columns (to report: average, per group, per set), then each `extra` column
    (name -> cell of the runs)."""
    first = next(iter(rows.values()))[0]
    sets, groups = list(first["ood"]), list(first["groups"])
    val_groups = list(first.get("validation", {}).get("groups", {}))
    extra = extra or {}
    names = [
        *labels, "val FPR95 ↓", "val AUROC ↑", *(f"val {g}" for g in val_groups),
        "FPR95 ↓", "AUROC ↑", *(f"AUROC {g}" for g in groups), *(f"AUROC {s}" for s in sets), *extra,
    ]
    lines = ["| " + " | ".join(names) + " |", "|" + " --- |" * len(names)]
    for key, runs in rows.items():
        cells = [
            *key,
            validation_mean_std(runs, "fpr95"),
            validation_mean_std(runs, "auroc"),
            *[validation_group_mean_std(runs, g) for g in val_groups],
            mean_std([r["average"]["fpr95"] for r in runs]),
            mean_std([r["average"]["auroc"] for r in runs]),
            *[mean_std([r["groups"][g]["auroc"] for r in runs]) for g in groups],
            *[mean_std([r["ood"][s]["auroc"] for r in runs]) for s in sets],
            *[cell(runs) for cell in extra.values()],
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _in_class(runs: list[dict]) -> str:
    fractions = [r["diagnostics"]["outlier_in_class_fraction"] for r in runs if "diagnostics" in r]
    return mean_std(fractions) if fractions else "–"


def table(reports: dict[tuple[str, str], list[dict]]) -> str:
    """One row per (outliers, head), with ID accuracy and the outliers' in-class fraction."""
    return metric_table(["outliers", "head"], reports, {"ID acc.": lambda runs: mean_std([r["id_accuracy"] for r in runs]), "in-class ↓": _in_class})


def group_losses(runs: list[dict], baseline: list[dict]) -> dict[str, float]:
    """Validation groups whose mean AUROC over seeds is below the baseline's: group -> the loss (negative)."""
    losses = {}
    for group in baseline[0]["validation"]["groups"]:
        delta = np.mean([r["validation"]["groups"][group]["auroc"] for r in runs]) - np.mean([b["validation"]["groups"][group]["auroc"] for b in baseline])
        if delta < 0:
            losses[group] = float(delta)
    return losses


def best_on_validation(rows: dict, label, baseline=None) -> str:
    """The sentence naming the row (`label(key)`) with the highest mean validation AUROC, or "" without
    validation sets. With `baseline` (the key of the no-outlier row) the rule is the project's
    (docs/digits-study.md, "Choosing on validation"): a row that loses any validation group's mean
    AUROC to the baseline is not chosen, however high its average; the sentence names what it lost."""
    means = {key: np.mean([r["validation"]["average"]["auroc"] for r in runs]) for key, runs in rows.items() if all("validation" in r for r in runs)}
    if not means:
        return ""
    losing = {}
    if baseline is not None and baseline in means:
        losing = {key: losses for key in means if key != baseline and (losses := group_losses(rows[key], rows[baseline]))}
    eligible = {key: mean for key, mean in means.items() if key not in losing}
    best = max(eligible, key=eligible.get)
    sentence = f"Highest validation AUROC: {label(best)} ({100 * means[best]:.1f})"
    if baseline is None:
        return sentence + ".\n"
    lost = "; ".join(f"{label(key)} ({', '.join(f'{g} {100 * d:+.1f}' for g, d in losses.items())})" for key, losses in losing.items())
    return sentence + f", of the rows that lose no validation group to {label(baseline)}" + (f". Losing a group: {lost}.\n" if lost else ".\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=["none", "cvpn", "linear", "knn"], choices=list(VARIANTS))
    parser.add_argument("--heads", nargs="+", default=[None], help="classifier.energy_head values (default: params.yaml's)")
    parser.add_argument("--set", dest="overrides", action="append", default=[])
    parser.add_argument("--outputs", default="outputs/results")
    parser.add_argument("--base", default=None, help="reuse outputs of this folder (see --reuse) instead of recomputing them")
    parser.add_argument("--reuse", nargs="+", default=list(SHARED), choices=list(SHARED), help="what --base provides")
    parser.add_argument("--readme", action="store_true", help="publish: write the table to docs/results.md and README.md")
    args = parser.parse_args()

    common = ["tracking.enabled=false", *args.overrides]
    root = Path(args.outputs)
    base = prepare_base(root, common, args.base, args.reuse, generator=any(v in SYNTHETIC for v in args.variants))
    default_head = load_params(overrides=common).classifier.energy_head

    reports: dict[tuple[str, str], list[dict]] = {}
    for seed in args.seeds:
        for variant in args.variants:
            first = None
            for head in args.heads:
                head_name = head or default_head
                overrides = [*common, *VARIANTS[variant], f"seed={seed}"] + ([f"classifier.energy_head={head}"] if head else [])
                out = root / f"{variant}-{head_name}-seed{seed}"
                print(f"[results] {out.name}", flush=True)
                reports.setdefault((variant, head_name), []).append(variant_run(base, out, overrides, variant, first))
                first = first or out
                (root / "reports.json").write_text(json.dumps({f"{v}/{h}": r for (v, h), r in reports.items()}, indent=1))

    text = table(reports)
    command = "python benchmarks/results.py " + " ".join(
        [f"--seeds {' '.join(map(str, args.seeds))}", f"--variants {' '.join(args.variants)}"]
        + ([f"--heads {' '.join(args.heads)}"] if args.heads != [None] else [])
        + [f"--set {o}" for o in args.overrides]
        + ([f"--base {args.base}"] if args.base else [])
        + (["--readme"] if args.readme else [])
    )
    baseline = next((key for key in reports if key[0] == "none"), None)
    choice = best_on_validation(reports, lambda key: " / ".join(key), baseline)
    body = f"Regenerate with `{command.strip()}` ({len(args.seeds)} seeds; mean ± std in %).\n\n{text}\n" + (f"\n{choice}" if choice else "")
    print("\n" + body)
    (root / "results.md").write_text(body)
    if args.readme:
        (ROOT / "docs" / "results.md").write_text("# Results on digits\n\n" + body)
        write_between_markers(ROOT / "README.md", "results", body)


if __name__ == "__main__":
    main()
