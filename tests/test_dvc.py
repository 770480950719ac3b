"""DVC front door: dvc.yaml against the CLI, params and layout (fast), then the real `dvc` CLI (slow):
`dvc repro` of a tiny digits pipeline, a parameter change that reruns only its dependents,
and `dvc push` / `git clone` / `dvc pull` restoring outputs that `ncis evaluate` reproduces."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ncis.pipeline import STAGES
from ncis.config import load_params
from ncis.layout import Layout

ROOT = Path(__file__).resolve().parents[1]
OUT = "${outputs}"
# Modules that decide how a stage runs or reports, not what it computes: not DVC deps.
NOT_RESULT_MODULES = {"ncis", "ncis.__main__", "ncis.cli", "ncis.pipeline", "ncis.tracking", "ncis.errors", "ncis.layout"}
NOT_RESULT_PARAMS = {"outputs", "device", "tracking"}


def dvc_stages() -> dict:
    return yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def paths(entries) -> list[str]:
    """dvc.yaml lists hold plain paths or {path: options}."""
    return [next(iter(e)) if isinstance(e, dict) else e for e in entries or []]


def under(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


# --------------------------------------------------------------------------- fast: dvc.yaml itself


def test_stages_are_the_cli_stages_in_order():
    stages = dvc_stages()
    assert list(stages) == list(STAGES)
    for name, stage in stages.items():
        assert stage["cmd"] == f"ncis {name}", "a DVC stage runs exactly the CLI, so it is tracked like one"


def test_outs_follow_the_layout():
    layout = Layout(Path(OUT))
    expected = {
        "prepare": {layout.data, layout.tiny_diffusion},
        "embed": {layout.embed_dir},
        "train-cvpn": {layout.cvpn},
        "sample": {layout.outliers},
        "synthesize": {layout.synthetic_images, layout.synth_dir / "diagnostics.json", layout.preview},
        "train-classifier": {layout.classifier, layout.classifier_checkpoints},
        "evaluate": {layout.metrics, layout.plots},
    }
    for name, stage in dvc_stages().items():
        declared = paths(stage.get("outs")) + paths(stage.get("metrics")) + paths(stage.get("plots"))
        assert sorted(declared) == sorted(str(p) for p in expected[name]), name
    assert paths(dvc_stages()["evaluate"]["metrics"]) == [str(layout.metrics)]


def test_every_output_dep_comes_from_an_earlier_stage():
    produced: list[str] = []
    for name, stage in dvc_stages().items():
        for dep in paths(stage["deps"]):
            if dep.startswith(OUT):
                assert any(under(dep, out) for out in produced), f"{name}: {dep} is no earlier stage's output"
        produced += paths(stage.get("outs")) + paths(stage.get("metrics")) + paths(stage.get("plots"))


def _keys(tree: dict, prefix: str = "") -> set[str]:
    keys = set()
    for key, value in tree.items():
        keys.add(prefix + key)
        if isinstance(value, dict):
            keys |= _keys(value, f"{prefix}{key}.")
    return keys


@pytest.mark.parametrize("params_file", ["params.yaml", "configs/cifar100.yaml", "configs/imagenet100.yaml"])
def test_params_exist_and_exclude_placement_keys(params_file):
    """DVC refuses a listed key missing from params.yaml; the configs are copied over it (docs/dvc.md)."""
    in_file = _keys(yaml.safe_load((ROOT / params_file).read_text()))
    in_model = _keys(load_params(ROOT / "params.yaml").model_dump())
    for name, stage in dvc_stages().items():
        for key in stage["params"]:
            assert isinstance(key, str), f"{name}: params come from params.yaml only"
            assert key in in_model, f"{name}: {key} is no parameter (ncis/config.py)"
            assert key in in_file, f"{name}: {key} missing from {params_file}"
            assert key.split(".")[0] not in NOT_RESULT_PARAMS, f"{name}: {key} does not change results"


def _imports(module: str) -> set[str]:
    """ncis modules `module` imports anywhere in its source (function-level imports too)."""
    source = ROOT / (module.replace(".", "/") + ".py")
    if not source.exists():
        source = ROOT / module.replace(".", "/") / "__init__.py"
    found = set()
    for node in ast.walk(ast.parse(source.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ncis":
            found.add(node.module)
            # `from ncis import tracking` / `from ncis.datasets import cifar100`: submodules
            for alias in node.names:
                candidate = f"{node.module}.{alias.name}"
                if (ROOT / (candidate.replace(".", "/") + ".py")).exists() or (ROOT / candidate.replace(".", "/")).is_dir():
                    found.add(candidate)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "ncis"}
    return found


def _closure(module: str) -> set[str]:
    """`module` and every ncis module it reaches through imports."""
    seen, todo = set(), [module]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += _imports(current)
    return seen


def _file_of(module: str) -> str:
    path = module.replace(".", "/")
    return path if (ROOT / path).is_dir() else path + ".py"


@pytest.mark.parametrize("stage", list(STAGES))
def test_code_deps_are_exactly_the_imported_modules(stage):
    """Every ncis module the stage (transitively) imports is a dep, and every code dep is imported."""
    # ncis.config: the CLI validates (and fills defaults of) every key before any stage runs.
    used = _closure(STAGES[stage][0]) | _closure("ncis.config")
    modules = {m for m in used if m not in NOT_RESULT_MODULES}
    files = {_file_of(m) for m in modules}
    code_deps = [d for d in paths(dvc_stages()[stage]["deps"]) if d.startswith("ncis/")]
    missing = sorted(f for f in files if not any(under(f, d) for d in code_deps))
    assert not missing, f"{stage}: add to its deps in dvc.yaml: {missing}"
    unused = sorted(d for d in code_deps if not any(under(f, d) for f in files))
    assert not unused, f"{stage}: deps in dvc.yaml it does not import: {unused}"


# --------------------------------------------------------------------------- slow: the real dvc CLI

# A few seconds of work per stage; every key name is checked by ncis/config.py when the stage loads it.
TINY = {
    "device": "cpu",
    "data": {"ood_size": 10},
    "diffusion": {"train_steps": 30, "train_batch_size": 32, "unet_channels": [8, 16], "text_width": 16},
    "embed": {"steps": 1, "noise_draws": 2, "batch_size": 256},
    "cvpn": {"epochs": 2, "hidden": 16, "batch_size": 256},
    "sample": {"candidates": 50, "keep": 2, "rounds": 2},
    "synthesize": {"steps": 3, "control_per_class": 1, "preview_per_class": 2},
    "classifier": {"arch": "small_cnn", "epochs": 1, "max_outliers": 100},
    "tracking": {"enabled": False},
}
# What the pipeline needs to run, copied from the checkout (tests/, docs/ are not needed).
PROJECT_FILES = ["ncis", "dvc.yaml", "params.yaml", "pyproject.toml", ".gitignore"]
RAN = re.compile(r"^Running stage '([^']+)'", re.MULTILINE)


def _env(home: Path) -> dict:
    env = dict(os.environ)
    for key in [k for k in env if k.startswith(("MLFLOW_", "DVC_", "GIT_"))]:
        del env[key]
    env.update(
        # the venv's `ncis` for the stage commands; the copy's package ahead of the editable install
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
        PYTHONPATH="",
        HOME=str(home),  # no user git/dvc config leaks in
        GIT_CONFIG_NOSYSTEM="1",
        GIT_AUTHOR_NAME="ncis test", GIT_AUTHOR_EMAIL="test@example.invalid",
        GIT_COMMITTER_NAME="ncis test", GIT_COMMITTER_EMAIL="test@example.invalid",
        OMP_NUM_THREADS="1",  # tiny stages: extra threads only contend on a shared machine
        DVC_NO_ANALYTICS="1",
        DVC_SITE_CACHE_DIR=str(home / "dvc-site-cache"),
        DVC_GLOBAL_CONFIG_DIR=str(home / "dvc-global"),
        DVC_SYSTEM_CONFIG_DIR=str(home / "dvc-system"),
    )
    return env


class Repo:
    def __init__(self, path: Path, env: dict):
        self.path, self.env = path, {**env, "PYTHONPATH": str(path)}

    def run(self, *args: str, timeout: float = 300) -> str:
        done = subprocess.run(args, cwd=self.path, env=self.env, capture_output=True, text=True, timeout=timeout)
        output = done.stdout + done.stderr
        assert done.returncode == 0, f"{' '.join(args)} failed ({done.returncode}):\n{output[-4000:]}"
        return output

    def dvc(self, *args: str, timeout: float = 300) -> str:
        return self.run(sys.executable, "-m", "dvc", *args, timeout=timeout)

    def git(self, *args: str) -> str:
        return self.run("git", *args)

    def commit(self, message: str) -> None:
        self.git("add", "-A")
        self.git("commit", "-q", "-m", message)

    def params(self) -> dict:
        return yaml.safe_load((self.path / "params.yaml").read_text())

    def digests(self) -> dict[str, str]:
        return {
            str(p.relative_to(self.path)): hashlib.md5(p.read_bytes()).hexdigest()
            for p in sorted((self.path / "outputs").rglob("*"))
            if p.is_file()
        }


def ran_stages(output: str) -> list[str]:
    return RAN.findall(output)


@pytest.fixture(scope="module")
def reproduced(tmp_path_factory):
    """A git + DVC copy of the project with tiny params, after one full `dvc repro` (committed)."""
    base = tmp_path_factory.mktemp("dvc")
    (base / "home").mkdir()
    repo = Repo(base / "project", _env(base / "home"))
    repo.path.mkdir()
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, repo.path / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, repo.path / name)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    for key, value in TINY.items():
        params[key] = {**params[key], **value} if isinstance(value, dict) else value
    (repo.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))

    repo.git("init", "-q")
    repo.dvc("init", "-q")
    shutil.copy2(ROOT / ".dvcignore", repo.path / ".dvcignore")  # over the one `dvc init` writes
    repo.commit("project")
    imported = repo.run(sys.executable, "-c", "import ncis; print(ncis.__file__)")
    assert imported.strip().startswith(str(repo.path)), "the stages must run the copied code"

    output = repo.dvc("repro", timeout=600)
    repo.commit("dvc repro")
    return repo, output


@pytest.mark.slow
def test_repro_runs_every_stage_and_locks_its_outputs(reproduced):
    repo, output = reproduced
    assert ran_stages(output) == list(STAGES)
    lock = yaml.safe_load((repo.path / "dvc.lock").read_text())["stages"]
    assert list(lock) == list(STAGES)
    for name, entry in lock.items():
        assert entry["cmd"] == f"ncis {name}"
        for out in entry["outs"]:
            assert (repo.path / out["path"]).exists() and out["md5"], (name, out)
    assert lock["evaluate"]["params"]["params.yaml"]["evaluate"]["score"] == "energy"
    assert "Data and pipelines are up to date" in repo.dvc("status")

    metrics = json.loads(repo.dvc("metrics", "show", "--json"))
    report = next(iter(metrics.values()))["data"]["outputs/metrics.json"]["data"]  # the workspace's
    assert report["benchmark"] == "digits" and 0 <= report["id_accuracy"] <= 1
    assert set(report["ood"]) == {"letters", "photos", "textures", "noise"}
    repo.dvc("plots", "show", "-o", "plots_html")
    page = (repo.path / "plots_html" / "index.html").read_text()
    assert "roc.png" in page and "preview.png" in page


@pytest.mark.slow
def test_push_then_pull_in_a_fresh_clone_restores_evaluable_outputs(reproduced, tmp_path):
    repo, _ = reproduced
    remote = tmp_path / "remote"
    repo.dvc("remote", "add", "-d", "storage", str(remote))
    repo.commit("remote")
    repo.dvc("push")

    clone = Repo(tmp_path / "clone", repo.env)
    repo.run("git", "clone", "-q", str(repo.path), str(clone.path))
    clone.env["PYTHONPATH"] = str(clone.path)
    assert not (clone.path / "outputs").exists()
    clone.dvc("pull")
    assert "Data and pipelines are up to date" in clone.dvc("status")
    assert clone.digests() == repo.digests()

    # The pulled classifier evaluates without any retraining, to the same numbers.
    (clone.path / "outputs" / "metrics.json").unlink()
    shutil.rmtree(clone.path / "outputs" / "plots")
    clone.run("ncis", "evaluate")
    assert (clone.path / "outputs" / "metrics.json").read_bytes() == (repo.path / "outputs" / "metrics.json").read_bytes()
    assert "Data and pipelines are up to date" in clone.dvc("status")


@pytest.mark.slow
def test_exp_run_with_a_changed_param_reruns_only_its_dependents(reproduced):
    """Last: it leaves the experiment applied to the workspace."""
    repo, _ = reproduced
    upstream = repo.path / "outputs" / "cvpn" / "model.safetensors"
    before = upstream.stat().st_mtime_ns

    output = repo.dvc("exp", "run", "-S", "classifier.epochs=2", timeout=600)
    assert ran_stages(output) == ["train-classifier", "evaluate"]
    assert upstream.stat().st_mtime_ns == before
    assert repo.params()["classifier"]["epochs"] == 2
    assert "classifier.epochs" in repo.dvc("params", "diff")
    changed = json.loads(repo.dvc("metrics", "diff", "--json"))["outputs/metrics.json"]
    assert "average.auroc" in changed
    assert "Data and pipelines are up to date" in repo.dvc("status")
