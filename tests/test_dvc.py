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
from pydantic import BaseModel

from ncis.config import Params, is_placement
from ncis.pipeline import STAGES
from ncis.layout import Layout
from ncis.datasets import get_benchmark

ROOT = Path(__file__).resolve().parents[1]
OUT = "${outputs}"
# Modules that decide how a stage runs or reports, not what it computes: not DVC deps.
NOT_RESULT_MODULES = {"ncis", "ncis.__main__", "ncis.cli", "ncis.pipeline", "ncis.tracking", "ncis.inputs", "ncis.errors", "ncis.layout"}


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
        "pretrain-classifier": {layout.pretrained_classifier, layout.pretrained_classifier_checkpoints},
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


def params_schema(model: type[BaseModel] = Params) -> dict:
    """field -> its sub-schema (a section) or None (a value), from ncis/config.py's models."""
    tree = {}
    for name, info in model.model_fields.items():
        kind = info.annotation
        tree[name] = params_schema(kind) if isinstance(kind, type) and issubclass(kind, BaseModel) else None
    return tree


@pytest.mark.parametrize("params_file", ["params.yaml", "configs/cifar100.yaml", "configs/imagenet100.yaml"])
def test_params_exist_and_exclude_placement_keys(params_file):
    """DVC refuses a listed key missing from params.yaml; the configs are copied over it (docs/dvc.md)."""
    in_file = _keys(yaml.safe_load((ROOT / params_file).read_text()))
    in_model = _keys(params_schema())
    for name, stage in dvc_stages().items():
        for key in stage["params"]:
            assert isinstance(key, str), f"{name}: params come from params.yaml only"
            assert key in in_model, f"{name}: {key} is no parameter (ncis/config.py)"
            assert key in in_file, f"{name}: {key} missing from {params_file}"
            assert not is_placement(key), f"{name}: {key} does not change results"


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


# --------------------------------------------------------------------------- fast: the params each stage reads
#
# Follows `params` from each stage's `main(params)` through the ncis code: attribute chains
# (`params.cvpn.lr`), section aliases (`cfg = params.embed`, then `cfg.steps`), and sections or
# the whole object passed on to ncis functions (`fit_cvpn(..., config)` binds `config` to
# `params.cvpn`; `benchmark.prepare_data(params, ...)`, a call on an object, reaches every ncis
# function of that name). A section used otherwise (`cfg.model_dump()`) is read whole.

PARAMS_SCHEMA = params_schema()
ParamsPath = tuple  # ("embed", "steps"); () is the whole params object


def _schema_at(path: ParamsPath) -> dict | None:
    """The section at `path` (a dict of its fields), or None for a single value."""
    node = PARAMS_SCHEMA
    for part in path:
        node = node[part]
    return node


def _params_path(node: ast.expr, env: dict[str, ParamsPath]) -> ParamsPath | None:
    """The params path an expression stands for: `cfg.steps` with cfg bound to ('embed',) -> ('embed', 'steps')."""
    if isinstance(node, ast.Name):
        return env.get(node.id)
    if isinstance(node, ast.Attribute):
        base = _params_path(node.value, env)
        fields = _schema_at(base) if base is not None else None
        if fields is not None and node.attr in fields:
            return (*base, node.attr)
    return None


class _Module:
    def __init__(self, name: str, source: str):
        self.name, self.tree = name, ast.parse(source)
        self.defs = {n.name: n for n in self.tree.body if isinstance(n, (ast.FunctionDef, ast.ClassDef))}
        self.imports: dict[str, str] = {}  # local name -> qualified ncis name (function-level imports too)
        for node in ast.walk(self.tree):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "ncis":
                self.imports.update({a.asname or a.name: f"{node.module}.{a.name}" for a in node.names})
            elif isinstance(node, ast.Import):
                self.imports.update({a.asname: a.name for a in node.names if a.asname and a.name.split(".")[0] == "ncis"})


class ParamsReads:
    """The params keys code under `root` reads, starting from a stage module's `main(params)`.

    `keys`: dotted paths; a section's path means the whole section. `lost`: places where the
    whole params object goes somewhere this analysis cannot follow (the test must then learn it).
    """

    def __init__(self, root: Path, stage_module: str):
        self.root, self.keys, self.lost = root, set(), []
        self._modules: dict[str, _Module | None] = {}
        self._done: set = set()
        module = self._module(stage_module)
        main = module.defs["main"]
        self._function(module, main, {main.args.args[0].arg: ()})

    def _module(self, name: str) -> _Module | None:
        if name not in self._modules:
            base = self.root / name.replace(".", "/")
            source = next((p for p in (base.with_suffix(".py"), base / "__init__.py") if p.is_file()), None)
            self._modules[name] = _Module(name, source.read_text()) if source else None
        return self._modules[name]

    def _lookup(self, qualified: str, hops: int = 0):
        """'ncis.x.f' -> a _Module, (module, def) or None; follows re-exports (`from ncis.datasets import data_root`)."""
        if self._module(qualified) is not None:
            return self._module(qualified)
        owner_name, _, name = qualified.rpartition(".")
        owner = self._module(owner_name) if owner_name else None
        if owner is None or hops > 5:
            return None
        if name in owner.defs:
            return owner, owner.defs[name]
        return self._lookup(owner.imports[name], hops + 1) if name in owner.imports else None

    def _all_named(self, name: str) -> list:
        """Every ncis function or method called `name`: where a call on an object may go."""
        found = []
        for path in sorted((self.root / "ncis").rglob("*.py")):
            parts = path.relative_to(self.root).with_suffix("").parts
            module = self._module(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
            for node in module.tree.body:
                if isinstance(node, ast.FunctionDef) and node.name == name:
                    found.append((module, node, 0))
                elif isinstance(node, ast.ClassDef):
                    found += [(module, m, 1) for m in node.body if isinstance(m, ast.FunctionDef) and m.name == name]
        return found

    def _callees(self, module: _Module, func: ast.expr) -> list:
        """(module, function, implicit leading arguments) that a call may run; [] = no ncis code."""
        target = None
        if isinstance(func, ast.Name):
            target = (module, module.defs[func.id]) if func.id in module.defs else None
            if target is None and func.id in module.imports:
                target = self._lookup(module.imports[func.id])
        elif isinstance(func, ast.Attribute):
            owner = self._named_module(module, func.value)
            if owner is None:
                return self._all_named(func.attr)
            target = self._lookup(f"{owner.name}.{func.attr}")
        if not isinstance(target, tuple):
            return []
        owner, node = target
        if isinstance(node, ast.ClassDef):
            return [(owner, m, 1) for m in node.body if isinstance(m, ast.FunctionDef) and m.name == "__init__"]
        return [(owner, node, 0)]

    def _named_module(self, module: _Module, node: ast.expr) -> _Module | None:
        """The ncis module an expression names (`helpers`, `helpers.impl`), else None."""
        found = None
        if isinstance(node, ast.Name) and node.id in module.imports:
            found = self._lookup(module.imports[node.id])
        elif isinstance(node, ast.Attribute) and (owner := self._named_module(module, node.value)) is not None:
            found = self._lookup(f"{owner.name}.{node.attr}")
        return found if isinstance(found, _Module) else None

    def _function(self, module: _Module, func: ast.FunctionDef, bound: dict[str, ParamsPath]) -> None:
        key = (module.name, func.lineno, tuple(sorted(bound.items())))
        if key in self._done:
            return
        self._done.add(key)
        env, changed = dict(bound), True
        while changed:  # aliases, wherever they are assigned in the function
            changed = False
            for node in ast.walk(func):
                if isinstance(node, ast.Assign) and (path := _params_path(node.value, env)) is not None:
                    for target in node.targets:
                        if isinstance(target, ast.Name) and env.get(target.id) != path:
                            env[target.id], changed = path, True
        parents = {child: node for node in ast.walk(func) for child in ast.iter_child_nodes(node)}
        for node in ast.walk(func):
            if not isinstance(node, (ast.Name, ast.Attribute)) or isinstance(node.ctx, ast.Store):
                continue
            path, parent = _params_path(node, env), parents.get(node)
            if path is None or (isinstance(parent, ast.Attribute) and _params_path(parent, env) is not None):
                continue  # not params, or the inside of a longer chain
            where = f"{module.name}:{node.lineno}"
            if _schema_at(path) is None:
                self.keys.add(".".join(path))  # one value: read here, whatever happens to it next
            elif isinstance(parent, ast.keyword) and parent.arg is not None:
                self._call(module, parents[parent], path, where, keyword=parent.arg)
            elif isinstance(parent, ast.Call) and node in parent.args:
                self._call(module, parent, path, where, position=parent.args.index(node))
            elif not (isinstance(parent, ast.Assign) and all(isinstance(t, ast.Name) for t in parent.targets)):
                self._whole(path, where)  # an alias assignment is followed through env instead

    def _call(self, module, call: ast.Call, path: ParamsPath, where: str, position=None, keyword=None) -> None:
        callees = self._callees(module, call.func)
        if not callees:
            self._whole(path, where)
        for owner, func, implicit in callees:
            positional = [a.arg for a in func.args.posonlyargs + func.args.args][implicit:]
            name = keyword if keyword is not None else (positional[position] if position < len(positional) else None)
            if name in [a.arg for a in func.args.posonlyargs + func.args.args + func.args.kwonlyargs]:
                self._function(owner, func, {name: path})
            else:
                self._whole(path, where)

    def _whole(self, path: ParamsPath, where: str) -> None:
        if path:
            self.keys.add(".".join(path))
        else:
            self.lost.append(f"{where}: the params object goes where this test cannot follow it")


def _covers(listed: str, read: str) -> bool:
    """A listed section covers its keys."""
    return read == listed or read.startswith(listed + ".")


def _leaf_keys(path: str) -> set[str]:
    node = _schema_at(tuple(path.split(".")))
    return {path} if node is None else {k for field in node for k in _leaf_keys(f"{path}.{field}")}


def test_params_reads_follow_aliases_calls_and_dispatch(tmp_path):
    """The analysis itself, on a made-up package: each way of reaching a key is seen, and no more."""
    (tmp_path / "ncis" / "sub").mkdir(parents=True)
    (tmp_path / "ncis" / "__init__.py").write_text("")
    (tmp_path / "ncis" / "sub" / "__init__.py").write_text("from ncis.sub.impl import fit\n")
    (tmp_path / "ncis" / "sub" / "impl.py").write_text(
        "def fit(config, seed):\n    return config.lr * seed\n"
        "class Trainer:\n    def __init__(self, settings):\n        self.k = settings.knn_k\n"
        "def prepare_data(params, layout):\n    return params.data.root\n"
        "def never_called(params):\n    return params.classifier.lr\n"
    )
    (tmp_path / "ncis" / "stage.py").write_text(
        "from ncis import sub as helpers\nfrom ncis.sub import fit\n"
        "def main(params):\n"
        "    cfg = params.embed\n    print(cfg.steps)\n"             # an alias
        "    fit(params.cvpn, seed=params.seed)\n"                      # a section passed, a value by keyword
        "    helpers.impl.Trainer(params.sample)\n"                     # a class: its __init__
        "    benchmark.prepare_data(params, None)\n"                    # a call on an object: by name
        "    record(params.evaluate.model_dump())\n"                   # a section used whole
        "    unknown(params)\n"                                         # lost
    )
    reads = ParamsReads(tmp_path, "ncis.stage")
    assert reads.keys == {"embed.steps", "cvpn.lr", "seed", "sample.knn_k", "data.root", "evaluate"}
    assert len(reads.lost) == 1 and "ncis.stage:10" in reads.lost[0]


@pytest.mark.parametrize("stage", list(STAGES))
def test_params_are_exactly_the_keys_the_stage_reads(stage):
    """A key a stage reads but dvc.yaml does not list would not rerun it; one listed but unread reruns it for nothing."""
    reads = ParamsReads(ROOT, STAGES[stage][0])
    assert not reads.lost, f"{stage}: teach this test where params goes: {reads.lost}"
    read = {key for key in reads.keys if not is_placement(key)}
    listed = dvc_stages()[stage]["params"]
    missing = sorted(key for key in read if not any(_covers(entry, key) for entry in listed))
    assert not missing, f"{stage}: add to its params in dvc.yaml: {missing}"
    read_leaves = set().union(*(_leaf_keys(key) for key in read))
    unread = sorted(leaf for entry in listed for leaf in _leaf_keys(entry) if leaf not in read_leaves and not is_placement(leaf))
    assert not unread, f"{stage}: params in dvc.yaml it never reads (list single keys instead of the section): {unread}"


# --------------------------------------------------------------------------- fast: the real benchmarks' dvc.yaml

EDIT = re.compile(r"#\s*real benchmarks:\s*(uncomment|delete)\b")


def real_benchmark_dvc_yaml(text: str) -> str:
    """dvc.yaml after the edits it marks "real benchmarks" (docs/dvc.md, "Another benchmark"):
    the line under each `# real benchmarks: uncomment ...` loses its `# `, the line under each
    `# real benchmarks: delete ...` goes."""
    lines, edit = [], None
    for line in text.splitlines(keepends=True):
        if edit == "delete":
            edit = None
            continue
        if edit == "uncomment":
            uncommented = re.sub(r"^(\s*)#\s?", r"\1", line)
            assert uncommented != line, f"nothing to uncomment under the marker: {line!r}"
            line, edit = uncommented, None
        found = EDIT.search(line)
        edit = found.group(1) if found else None
        lines.append(line)
    return "".join(lines)


def test_real_benchmark_edits_make_the_datasets_an_input_of_prepare_and_drop_the_tiny_model():
    edited = yaml.safe_load(real_benchmark_dvc_yaml((ROOT / "dvc.yaml").read_text()))["stages"]
    assert list(edited) == list(STAGES)
    assert "${data.root}" in paths(edited["prepare"]["deps"])
    tiny_model = str(Layout(Path(OUT)).tiny_diffusion)
    assert tiny_model in paths(dvc_stages()["prepare"]["outs"])  # digits: prepare trains it
    for name, stage in edited.items():
        for kind in ("deps", "outs"):
            assert tiny_model not in paths(stage.get(kind)), f"{name}: {tiny_model} is digits-only"
    produced: list[str] = []
    for name, stage in edited.items():  # still a pipeline whose inputs come from earlier stages
        for dep in paths(stage["deps"]):
            if dep.startswith(OUT):
                assert any(under(dep, out) for out in produced), f"{name}: {dep} is no earlier stage's output"
        produced += paths(stage.get("outs")) + paths(stage.get("metrics")) + paths(stage.get("plots"))
    # Only those lines change: every other stage entry is as written for digits.
    digits = dvc_stages()
    for name in STAGES:
        for key in set(digits[name]) | set(edited[name]):
            if key not in ("deps", "outs"):
                assert edited[name][key] == digits[name][key], (name, key)


@pytest.mark.parametrize("config", ["params.yaml", "configs/cifar100.yaml", "configs/imagenet100.yaml"])
def test_dvc_resolves_each_benchmarks_pipeline(config, tmp_path, monkeypatch):
    """As docs/dvc.md says: the config copied over params.yaml and, for a real benchmark, dvc.yaml
    edited; DVC itself then resolves `${data.root}` to the benchmark's data folder."""
    from dvc.repo import Repo as DvcRepo

    for variable, folder in [("DVC_SITE_CACHE_DIR", "site"), ("DVC_GLOBAL_CONFIG_DIR", "global"), ("DVC_SYSTEM_CONFIG_DIR", "system")]:
        monkeypatch.setenv(variable, str(tmp_path / "dvc-home" / folder))
    monkeypatch.setenv("DVC_NO_ANALYTICS", "1")
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy2(ROOT / config, project / "params.yaml")
    root = yaml.safe_load((ROOT / config).read_text())["data"].get("root")
    text = (ROOT / "dvc.yaml").read_text()
    (project / "dvc.yaml").write_text(real_benchmark_dvc_yaml(text) if root else text)
    DvcRepo.init(str(project), no_scm=True)
    with DvcRepo(str(project)) as repo:
        stages = {stage.name: stage for stage in repo.index.stages}
        prepare_deps = {str(dep.def_path) for dep in stages["prepare"].deps}
        prepare_outs = {str(out.def_path) for out in stages["prepare"].outs}
    assert list(stages) == list(STAGES)
    if root:
        assert root in prepare_deps and "outputs/diffusion" not in prepare_outs
    else:  # digits: its data is generated, its tiny model trained by prepare
        assert all(dep.startswith("ncis/") for dep in prepare_deps - {"params.yaml"}) and "outputs/diffusion" in prepare_outs


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


def _recomputed_by_the_saved_classifier(outputs: Path) -> tuple[float, float]:
    """ID test accuracy, and the energy score's AUROC against the `noise` OOD set, computed here from the
    classifier the pipeline saved and the image folders it prepared (sklearn, numpy, no `evaluate`)."""
    import numpy as np
    import torch
    from sklearn.metrics import roc_auc_score

    from ncis.classifiers import load_classifier
    from ncis.config import load_params
    from ncis.datasets import load_images
    from ncis.layout import layout_for

    layout = layout_for(load_params(overrides=[f"outputs={outputs}"]))
    benchmark = get_benchmark("digits")
    model, _ = load_classifier(layout.classifier)

    def logits(folder):
        images, labels = load_images(folder, benchmark.channels, benchmark.image_size)
        with torch.no_grad():
            return model.eval()(torch.as_tensor(images).permute(0, 3, 1, 2).float() / 255).double().numpy(), labels

    id_logits, id_labels = logits(layout.id_test)
    ood_logits, _ = logits(layout.ood("noise"))
    energy = lambda x: np.log(np.exp(x).sum(1))  # noqa: E731
    scores = np.r_[energy(id_logits), energy(ood_logits)]
    auroc = roc_auc_score(np.r_[np.ones(len(id_logits)), np.zeros(len(ood_logits))], scores)
    return float(np.mean(id_logits.argmax(1) == id_labels)), float(auroc)


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
    assert report == json.loads((repo.path / "outputs" / "metrics.json").read_text())
    assert report["benchmark"] == "digits" and list(report["ood"]) == list(get_benchmark("digits").ood_sets)
    expected_accuracy, expected_auroc = _recomputed_by_the_saved_classifier(repo.path / "outputs")
    assert report["id_accuracy"] == pytest.approx(expected_accuracy, abs=1e-12)
    assert report["ood"]["noise"]["auroc"] == pytest.approx(expected_auroc, abs=1e-9)
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
