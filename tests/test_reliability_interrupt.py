"""Killed jobs never cost finished work nor corrupt a result (real signals to real `ncis` processes).

One uninterrupted `ncis run` on digits (tiny settings, each long loop a few seconds) is the
reference. Then every long stage is run on a copy of its inputs and killed at a random point of
its loop, first with SIGKILL (no cleanup at all), then with SIGINT (Ctrl-C), then run to the end:
after each kill nothing lies half-written under a final name and the inputs are untouched, the
SIGINT exit is quick and says how to resume, and the final result is bit-identical to the
reference. A `ncis run` stopped in embed and continued with `--from embed` ends bit-identical to
it too, which also shows every stage deterministic on the CPU.
"""

from __future__ import annotations

import random
import re
import signal
import time
from pathlib import Path

import pytest
from faults import ROOT, TINY, Child, copy_outputs, debris, digests, ncis_lines, readable, run_ncis, sets

pytestmark = pytest.mark.slow

# TINY, with each stage's long loop made long enough to be caught in the middle.
LONG = [
    *TINY,
    "diffusion.train_steps=120",
    # embed: ~10 s (at TINY's 1 step x 2 draws, 100 images took 0.4 s: one progress update, and the
    # signal landed after the stage had ended)
    "embed.image_limit=200",
    "embed.steps=3",
    "embed.noise_draws=8",
    "embed.chunk_size=10",
    "embed.batch_size=5",
    "cvpn.epochs=150",
    # synthesize: ~10 s (at 10 steps a worker of `make test -n 2` rendered the 13 batches between two
    # progress updates, and the signal found the loop ended)
    "synthesize.steps=25",
    "synthesize.batch_size=4",
    "classifier.epochs=5",
]


def args(command: str, outputs: Path, *more: str) -> list[str]:
    return [command, "--params", str(ROOT / "params.yaml"), *sets([f"outputs={outputs}", *LONG, *more])]


# Per stage: its outputs under final names; its resume bookkeeping (complete files, rewritten or
# dropped by a rerun; their fingerprints hold file times, so they are left out of comparisons);
# and how its loop shows progress (a regex whose groups are (done, total)).
STAGES = {
    "prepare": (["data", "diffusion"], ["diffusion_checkpoints"], r"prepare: tiny diffusion model:.*?(\d+)/(\d+) \["),
    "embed": (["embed/embeddings.npz", "embed/summary.json"], ["embed/chunks"], r"embed: textual inversion:.*?(\d+)/(\d+) \["),
    "train-cvpn": (["cvpn"], ["cvpn_checkpoints"], r"train-cvpn:.*?(\d+)/(\d+) \["),
    "synthesize": (["synthesize"], ["synthesize_batches"], r"synthesize: outliers:.*?(\d+)/(\d+) \["),
    "train-classifier": (["classifier"], ["classifier_checkpoints"], r"epoch (\d+)/(\d+):"),
}
# Resume bookkeeping that differs between identical runs: it records input files' modification times.
VOLATILE = re.compile(r".*/(fingerprint|work-key)\.txt|classifier_checkpoints/epoch_\d+/state\.json")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    outputs = tmp_path_factory.mktemp("reference") / "outputs"
    code, output = run_ncis(args("run", outputs), outputs.parent, timeout=1200)
    assert code == 0, readable(output)
    return outputs


def stage_digests(outputs: Path, names: list[str]) -> dict[str, str]:
    found = {}
    for name in names:
        path = outputs / name
        if path.is_dir():
            found.update({f"{name}/{k}": v for k, v in digests(path).items()})
        elif path.exists():
            found.update({name: digests(path.parent)[path.name]})
    return found


def without(found: dict[str, str], prefixes: list[str]) -> dict[str, str]:
    """`found` less the given outputs, the lock file and what killed writers left (swept by the next run)."""
    kept = {}
    for key, value in found.items():
        if not key.startswith(tuple(prefixes)) and key != ".ncis.lock" and ".ncis-tmp-" not in key and ".ncis-old" not in key:
            kept[key] = value
    return kept


def progress(output: str, pattern: str) -> int:
    counts = [int(done) for done, _ in re.findall(pattern, output)]
    return max(counts, default=-1)


def interrupt(child: Child, pattern: str, signum: int, rng: random.Random) -> tuple[int, float]:
    """Wait until the stage's loop is at a random point of its progress, send `signum`; returns the
    progress reached and the seconds the process took to exit."""
    child.wait_for(pattern)
    total = int(re.search(pattern, child.output).group(2))
    # In the first 80% of the loop: progress moves in batches, and a point past the last update
    # before the end would fall after the loop.
    target = rng.randint(1, max(1, int(0.8 * total)))
    while progress(child.output, pattern) < target:
        assert child.process.poll() is None, f"ended before step {target} of {total}:\n{readable(child.output)}"
        time.sleep(0.05)
    done = progress(child.output, pattern)
    assert done < total, f"the loop had ended ({done}/{total}) before the signal: make its LONG settings longer"
    sent = time.monotonic()
    assert child.signal(signum), "the stage ended before the signal"
    child.wait(timeout=120)
    return target, time.monotonic() - sent


@pytest.mark.parametrize("stage", list(STAGES))
def test_a_stage_killed_at_random_points_resumes_to_the_identical_result(reference, tmp_path, stage):
    finals, bookkeeping, pattern = STAGES[stage]
    expected = stage_digests(reference, finals)
    rng = random.Random(f"{stage}-{time.time_ns()}")

    # Each signal on a fresh copy of the stage's inputs: after one interruption the rerun resumes
    # most of the work, and a second signal could then land after the shortened loop ended.
    for signum in (signal.SIGKILL, signal.SIGINT):
        outputs = copy_outputs(reference, tmp_path / f"outputs-{signum}", without=finals + bookkeeping)
        inputs = without(digests(outputs), finals + bookkeeping)
        child = Child(args(stage, outputs), tmp_path)
        at, took = interrupt(child, pattern, signum, rng)
        print(f"{stage}: {signal.Signals(signum).name} at step {at}, exit after {took:.1f} s")
        # Every final output is absent or whole (prepare's data, written before its loop).
        found = stage_digests(outputs, finals)
        for name in finals:
            part = {k: v for k, v in found.items() if k.startswith(name)}
            assert not part or part == {k: v for k, v in expected.items() if k.startswith(name)}, (signum, name)
        assert without(digests(outputs), finals + bookkeeping) == inputs, "an input changed"
        if signum == signal.SIGINT:
            assert child.process.returncode == 130
            assert took < 30, f"took {took:.0f} s to stop"
            messages = ncis_lines(child.output)
            assert messages[-1].startswith(f"ncis: stopped by SIGINT during stage {stage}; "), messages
            assert "rerun the same command to resume" in messages[-1]
            assert "Traceback" not in child.output
            assert debris(outputs) == [], "SIGINT must clean up its temporaries"
        else:
            assert child.process.returncode == -signal.SIGKILL

        # Work saved before the signal (more than the work key's stamp) is resumed, not redone.
        saved = [p for name in bookkeeping for p in (outputs / name).rglob("*") if p.is_file() and p.name != "work-key.txt"]
        code, output = run_ncis(args(stage, outputs), tmp_path)
        assert code == 0, readable(output)
        assert ("resuming" in output) == bool(saved), readable(output)
        assert stage_digests(outputs, finals) == expected
        assert debris(outputs) == [], "the rerun sweeps what the killed run left"
        if stage == "train-classifier":  # resumed from its checkpoints: their weights are the reference's too
            weights = [k for k in digests(outputs / "classifier_checkpoints") if k.endswith(".safetensors")]
            assert weights and all(
                digests(outputs / "classifier_checkpoints")[k] == digests(reference / "classifier_checkpoints")[k] for k in weights
            )


def differing_stages(reference: Path, outputs: Path) -> list[str]:
    """The stages whose outputs differ between two whole runs (resume bookkeeping left out)."""
    first, second = ({k: v for k, v in digests(o).items() if not VOLATILE.fullmatch(k)} for o in (reference, outputs))
    assert first.keys() == second.keys()
    stages = {"metrics.json": "evaluate", "plots": "evaluate", "sample": "sample"}
    stages.update({name.split("/")[0]: stage for stage, (finals, books, _) in STAGES.items() for name in finals + books})
    return sorted({stages.get(path.split("/")[0], path) for path in first if first[path] != second[path]})


def test_a_stopped_ncis_run_goes_on_from_its_stage_with_from(reference, tmp_path):
    """`ncis run` stopped in embed: the message names `--from embed`, and that rerun resumes embed's
    saved chunks (a plain rerun would rewrite prepare's data first, voiding them) and ends as the
    uninterrupted run did. Its prepare ran from nothing and every later stage whole, so this is
    also the check that every stage is deterministic on the CPU (a second whole run would add nothing)."""
    outputs = tmp_path / "outputs"
    child = Child(args("run", outputs), tmp_path)
    interrupt(child, STAGES["embed"][2], signal.SIGINT, random.Random(0))
    assert child.process.returncode == 130
    last = ncis_lines(child.output)[-1]
    assert last.startswith("ncis: stopped by SIGINT during stage embed; ") and "rerun it with --from embed" in last, last
    code, output = run_ncis([*args("run", outputs), "--from", "embed"], tmp_path, timeout=1200)
    assert code == 0, readable(output)
    assert "embed: resuming" in output and "prepare:" not in output, readable(output)
    differing = differing_stages(reference, outputs)
    assert differing == [], f"stages whose outputs differ from the uninterrupted run: {differing}"


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stopped_ncis_run_exits_non_zero_naming_the_stage(tmp_path, signum):
    """What a scheduler's SIGTERM (or Ctrl-C) does to a whole `ncis run`: same as to one stage."""
    outputs = tmp_path / "outputs"
    child = Child(args("run", outputs), tmp_path)
    interrupt(child, STAGES["prepare"][2], signum, random.Random(signum))
    assert child.process.returncode == 128 + signum
    last = ncis_lines(child.output)[-1]
    assert last.startswith(f"ncis: stopped by {signal.Signals(signum).name} during stage prepare; ")
    assert not (outputs / "diffusion").exists() and debris(outputs) == []
    assert not (outputs / ".ncis.lock").exists()
