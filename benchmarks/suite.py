"""Time the test suite as CI runs it: `make env` then `make test` in a fresh clone of HEAD.

Target (issue #26): `make test` under 800 s on the 2-core reference machine. Prints a Markdown
block for BENCHMARKS.md: the environment's and the suite's seconds, the suite's ratio to the
target, pytest's closing line and its slowest tests (`--durations`). Run it with nothing else on
the machine: two busy cores are what the suite is measured on.

    python benchmarks/suite.py [--durations 15] [--keep DIR]
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TARGET_S = 800


def timed(command: list[str], cwd: Path, env: dict[str, str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as out:
        done = subprocess.run(command, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"suite.py: `{' '.join(command)}` failed ({done.returncode}); see {log}")
    return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--durations", type=int, default=15, help="how many of the slowest tests to list")
    parser.add_argument("--keep", type=Path, default=None, help="clone into DIR and keep it (default: a temporary folder)")
    args = parser.parse_args()

    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    base = args.keep or Path(tempfile.mkdtemp(prefix="ncis-suite-"))
    clone = base / "clone"
    subprocess.run(["git", "clone", "-q", str(ROOT), str(clone)], check=True)
    # pytest's own options ride along in PYTEST_ADDOPTS, so `make test` runs exactly as in CI.
    env = {**os.environ, "CI": "true", "PYTEST_ADDOPTS": f"--durations={args.durations} -p no:cacheprovider"}
    env_s = timed(["make", "env"], clone, env, base / "env.log")
    suite_s = timed(["make", "test"], clone, env, base / "test.log")

    output = (base / "test.log").read_text()
    closing = [line for line in output.splitlines() if re.search(r"\d+ passed", line)][-1].strip("= ")
    slowest = re.findall(r"^([\d.]+)s (call|setup|teardown) +(\S+)$", output, flags=re.M)
    print(f"`python benchmarks/suite.py` at {head}: fresh clone, `make env` then `make test` (CI's command)\n")
    print("| step | seconds | ratio to target |\n| --- | ---: | ---: |")
    print(f"| `make env` (venv from the package registries) | {env_s:.0f} | |")
    print(f"| `make test` | {suite_s:.0f} | **{suite_s / TARGET_S:.2f}** (target {TARGET_S} s) |")
    print(f"\npytest: {closing}\n")
    print(f"Slowest {len(slowest)} (wall seconds inside a worker):\n")
    print("| seconds | phase | test |\n| ---: | --- | --- |")
    for seconds, phase, test in slowest:
        print(f"| {float(seconds):.1f} | {phase} | `{test}` |")


if __name__ == "__main__":
    main()
