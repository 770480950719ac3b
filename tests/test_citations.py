"""Every `file:line` citation of the paper's code in configs/*.yaml and docs/paper-fidelity.md names
a file of the cited repository at the commit paper-fidelity.md names, and lines that file has.

Reads the mirrored repositories (read-only git directories); where one is absent (CI) its
citations are skipped, and the whole test when NCIS's is. It checks that a citation can be
true, not what the line says: that is read by hand (docs/paper-fidelity.md).
"""

from __future__ import annotations

import re
import subprocess
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MIRRORS = Path("/work/.mirror")
# tag -> (mirrored git directory, commit): paper-fidelity.md's table of references
REPOS = {
    "N": (MIRRORS / "LarsDoorenbos+NCIS" / "repo", "42fb174"),
    "D": (MIRRORS / "deeplearning-wisc+dream-ood" / "repo", "fcb89c6"),
    "V": (MIRRORS / "LarsDoorenbos+Nonlinear-invariants" / "repo", "f91dd92"),
}
# Words on a line that say which repository the citations after them are in.
REPO_WORDS = {"LarsDoorenbos/NCIS": "N", "NCIS": "N", "dream-ood": "D", "Nonlinear-invariants": "V", "N": "N", "D": "D", "V": "V"}

LINES = r"\d+(?:-\d+)?(?:,\s?\d+(?:-\d+)?)*"
FILE_CITATION = re.compile(rf"(?<![\w/.-])([\w./-]+\.(?:py|yml|yaml|md)):({LINES})")
LETTER_CITATION = re.compile(rf"(?<![\w/.-])([A-Z]):({LINES})")
REPO_WORD = re.compile(r"(?<![\w/-])(LarsDoorenbos/NCIS|NCIS|dream-ood|Nonlinear-invariants|N|D|V)(?![\w/-])")
SOURCE = re.compile(r"(LarsDoorenbos/NCIS|deeplearning-wisc/dream-ood)|([\w./-]+\.\w+) \(([A-Z])\)")

pytestmark = pytest.mark.skipif(
    not (REPOS["N"][0] / "HEAD").exists(), reason=f"the paper's code is not mirrored here ({REPOS['N'][0]}): citations not checkable"
)


@cache
def tree(tag: str) -> dict[str, int] | None:
    """path -> line count of every text file of repository `tag` at its commit; None if not mirrored."""
    git_dir, commit = REPOS[tag]
    if not (git_dir / "HEAD").exists():
        return None
    names = subprocess.run(["git", "-C", str(git_dir), "ls-tree", "-r", "--name-only", commit], capture_output=True, text=True, check=True).stdout.split("\n")
    counts = {}
    for name in filter(None, names):
        if name.endswith((".py", ".yml", ".yaml", ".md")):
            text = subprocess.run(["git", "-C", str(git_dir), "show", f"{commit}:{name}"], capture_output=True, check=True).stdout
            counts[name] = text.count(b"\n") + (not text.endswith(b"\n") and bool(text))
    return counts


def resolve(tag: str, cited: str) -> str | None:
    """The repository path a citation names: exact, else the unique file ending in it."""
    files = tree(tag)
    if cited in files:
        return cited
    found = [f for f in files if f.endswith("/" + cited)]
    return found[0] if len(found) == 1 else None


def highest(lines: str) -> int:
    return max(int(n) for n in re.findall(r"\d+", lines))


def citations(path: Path) -> list[tuple[int, str, str, str]]:
    """(line number, repository tag, cited file, cited lines) in `path`."""
    found, letters = [], {}
    text = path.read_text().splitlines()
    for number, line in enumerate(text, 1):
        if path.suffix == ".yaml" and line.lstrip().startswith("# Sources:"):
            # `# Sources: <repo> <file> (<letter>), ...` (possibly over several comment lines):
            # each letter names a file of the repository last named before it.
            block, letters, repo = line, {}, "N"
            for more in text[number:]:
                if not more.startswith("# ") or more.startswith("# Input") or not more.strip("# "):
                    break
                block += " " + more
            for match in SOURCE.finditer(block):
                if match.group(1):
                    repo = "N" if match.group(1) == "LarsDoorenbos/NCIS" else "D"
                else:
                    letters[match.group(3)] = (repo, match.group(2))
            continue
        spans = [(m.start(), REPO_WORDS[m.group(1)]) for m in REPO_WORD.finditer(line)]
        for match in FILE_CITATION.finditer(line):
            if match.group(1) == "scripts/x.py":
                continue  # the form's own example
            if match.group(1).startswith("ncis/"):
                found.append((number, "ncis", match.group(1), match.group(2)))
                continue
            tag = next((t for start, t in reversed(spans) if start < match.start()), "N")
            found.append((number, tag, match.group(1), match.group(2)))
        if path.suffix == ".yaml":
            for match in LETTER_CITATION.finditer(line):
                if match.group(1) in letters:
                    tag, cited = letters[match.group(1)]
                    found.append((number, tag, cited, match.group(2)))
    return found


FILES = [*sorted((ROOT / "configs").glob("*.yaml")), ROOT / "docs" / "paper-fidelity.md"]


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_every_citation_names_an_existing_file_and_line(path):
    cited = citations(path)
    assert cited, f"{path.name}: no citations found; has their form changed?"
    wrong = []
    for number, tag, name, lines in cited:
        if tag == "ncis":  # this repository's own code
            own = ROOT / name
            if not own.is_file() or highest(lines) > len(own.read_text().splitlines()):
                wrong.append(f"{path.name}:{number}: {name}:{lines} is not in this repository")
            continue
        if tree(tag) is None:
            continue  # that repository is not mirrored here
        resolved = resolve(tag, name)
        if resolved is None:
            wrong.append(f"{path.name}:{number}: {tag} {name} is no file (or no unique file) of {tag} at {REPOS[tag][1]}")
        elif highest(lines) > tree(tag)[resolved]:
            wrong.append(f"{path.name}:{number}: {tag} {name}:{lines}, but {resolved} has {tree(tag)[resolved]} lines")
    assert not wrong, "\n".join(wrong)


def test_letter_citations_follow_their_sources_line():
    """The configs' `I:35` form is read through the `# Sources:` comment above it."""
    cited = citations(ROOT / "configs" / "imagenet100.yaml")
    assert any(tag == "N" and name == "scripts/train_ood_det_in100.py" and lines == "35" for _, tag, name, lines in cited)
    assert any(tag == "D" and name == "scripts/pretrain_in100.py" for _, tag, name, _ in cited)
