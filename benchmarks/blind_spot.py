"""Why an outlier-trained digits classifier can miss what a plain one catches: energies and statistics.

For each group of finished run folders (one per seed; e.g. the study's no-outlier runs and its
guidance settings), the classifier's mean energy score (logsumexp of the logits, higher = more
ID) on the ID test digits, on each `stats` test set, and on the ID test digits with their ink
scaled (x0.5, x1.25: is more ink more or less ID?); then the outlier pool's global statistics
from `synthesize/diagnostics.json` (mean-level AUROC against the ID images, local-contrast
ratio) and the stats group's test AUROC. Mean over seeds. With --publish the table goes between
the `<!-- study:blind_spot:start/end -->` markers of docs/digits-study.md.

    python benchmarks/blind_spot.py --runs "none=outputs/study/none/none-monotone-seed*" \\
        "guidance 7.5=outputs/study/guidance/guidance_scale=7.5/cvpn-monotone-seed*" [--publish]
"""

from __future__ import annotations

import argparse
import glob
import json
from pathlib import Path

import numpy as np
import torch

from results import ROOT, write_between_markers

from ncis.classifiers import eval_transform, load_classifier
from ncis.config import load_params
from ncis.datasets import get_benchmark, load_images
from ncis.layout import layout_for
from ncis.scores import energy_score

INK_SCALES = (0.5, 1.25)


@torch.no_grad()
def mean_energy(model, images: np.ndarray, transform) -> float:
    """Mean energy score of uint8 images [N, H, W, 1]."""
    from PIL import Image

    batch = torch.stack([transform(Image.fromarray(image[..., 0])) for image in images])
    return float(energy_score(model(batch)).mean())


def measure(run: Path) -> dict[str, float]:
    """Energies, outlier statistics and stats AUROC of one finished run folder."""
    params = load_params(overrides=[f"outputs={run}", "tracking.enabled=false"])
    layout, benchmark = layout_for(params), get_benchmark(params.benchmark)
    model, _ = load_classifier(layout.classifier)
    model.eval()
    transform = eval_transform(benchmark)
    digits, _ = load_images(layout.id_test, channels=1)
    row = {"ID digits": mean_energy(model, digits, transform)}
    for scale in INK_SCALES:
        inked = np.clip(np.round(digits.astype(np.float64) * scale), 0, 255).astype(np.uint8)
        row[f"digits x{scale}"] = mean_energy(model, inked, transform)
    stats_sets = [name for name, group in benchmark.ood_sets.items() if group == "stats"]
    for name in stats_sets:
        row[name] = mean_energy(model, load_images(layout.ood(name), channels=1)[0], transform)
    diagnostics = layout.synth_dir / "diagnostics.json"
    pool = json.loads(diagnostics.read_text()) if params.classifier.outliers == "ncis" and diagnostics.exists() else {}
    row["outliers' mean-level AUROC"] = pool.get("outlier_mean_level_auroc", float("nan"))
    row["outliers' local-contrast ratio"] = pool.get("outlier_local_contrast_ratio", float("nan"))
    row["stats AUROC"] = json.loads(layout.metrics.read_text())["groups"]["stats"]["auroc"]
    return row


def table(groups: dict[str, list[dict[str, float]]]) -> str:
    columns = list(next(iter(groups.values()))[0])
    lines = ["| runs | " + " | ".join(f"E {c}" if c in columns[: columns.index("outliers' mean-level AUROC")] else c for c in columns) + " |"]
    lines.append("|" + " --- |" * (len(columns) + 1))
    for label, rows in groups.items():
        cells = []
        for column in columns:
            value = np.mean([row[column] for row in rows])
            cells.append("–" if np.isnan(value) else f"{100 * value:.1f}" if column == "stats AUROC" else f"{value:.2f}")
        lines.append(f"| {label} ({len(rows)} seeds) | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", nargs="+", required=True, metavar="LABEL=GLOB", help="a label and the run folders (one per seed)")
    parser.add_argument("--publish", action="store_true", help="write the table into docs/digits-study.md")
    args = parser.parse_args()
    groups = {}
    for spec in args.runs:
        label, pattern = spec.split("=", 1)
        folders = sorted(Path(p) for p in glob.glob(pattern) if (Path(p) / "metrics.json").exists())
        if not folders:
            raise SystemExit(f"blind_spot: no finished run folder matches {pattern!r}")
        groups[label] = [measure(folder) for folder in folders]
    command = "python benchmarks/blind_spot.py --runs " + " ".join(f'"{spec}"' for spec in args.runs)
    text = (
        f"Mean energy score E (logsumexp of the logits; higher = more in-distribution) on the ID test digits, the digits with "
        f"their ink scaled, and each `stats` test set; the outlier pool's global statistics; the stats group's test AUROC. "
        f"`{command}`:\n\n{table(groups)}\n"
    )
    print(text)
    if args.publish:
        write_between_markers(ROOT / "docs" / "digits-study.md", "study:blind_spot", text)


if __name__ == "__main__":
    main()
