"""The in-repo DVC remote `dvc-store/` and `ncis publish` (docs/dvc.md, "Pretrained artifacts").

Fast: the committed remote holds exactly the outputs the committed dvc.lock names, each object
matches its hash, and none of them is a pickle. Slow: the real `dvc` CLI on a fresh `git clone`
of this repository's HEAD: `dvc pull`, `dvc status`, `dvc repro`, `ncis evaluate`, `dvc metrics
diff` against a tag, tampered files, and `ncis publish` to second remotes."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from configobj import ConfigObj
from safetensors import safe_open

from ncis.pipeline import STAGES
from ncis.publish import published_stages
from test_dvc import Repo, _env, ran_stages

ROOT = Path(__file__).resolve().parents[1]
STORE = ROOT / "dvc-store"
REPUBLISH = "run `dvc repro`, then `make publish-digits`, and commit dvc.lock and dvc-store/ (docs/dvc.md)"
UP_TO_DATE = "Data and pipelines are up to date"
# Every kind of file a stage writes; all load without pickle (safetensors, JSON, npz without
# object arrays, images, text). A .bin / .pt / .pkl / .ckpt output would be refused here.
SAFE_SUFFIXES = {".safetensors", ".json", ".npz", ".png", ".csv", ".txt"}


def lock_outs(lock_text: str) -> dict[str, str]:
    """Output path -> md5 (`<md5>.dir` for a folder) for every stage of a dvc.lock."""
    lock = yaml.safe_load(lock_text)["stages"]
    return {out["path"]: out["md5"] for entry in lock.values() for out in entry.get("outs", [])}


def store_object(store: Path, md5: str) -> Path:
    """Where a DVC 3 local remote keeps the object of `md5`."""
    return store / "files" / "md5" / md5[:2] / md5[2:]


def manifest(store: Path, md5: str) -> list[dict]:
    """A folder's `.dir` object: [{"md5": ..., "relpath": ...}, ...]."""
    return json.loads(store_object(store, md5).read_text())


def named_objects(store: Path, lock_text: str) -> dict[str, str]:
    """md5 -> a path it stands for, for every object the lock's outputs need (folders' files too)."""
    needed = {}
    for path, md5 in lock_outs(lock_text).items():
        needed[md5] = path
        if md5.endswith(".dir") and store_object(store, md5).is_file():
            needed.update({entry["md5"]: f"{path}/{entry['relpath']}" for entry in manifest(store, md5)})
    return needed


def held_objects(store: Path) -> set[str]:
    folder = store / "files" / "md5"
    return {p.parent.name + p.name for p in folder.glob("*/*") if p.is_file()} if folder.is_dir() else set()


# --------------------------------------------------------------------------- fast: the committed remote


def test_default_remote_is_the_in_repo_store_and_verifies_hashes():
    config = ConfigObj(str(ROOT / ".dvc" / "config"))
    name = config["core"]["remote"]
    remote = config[f'remote "{name}"']
    assert remote["url"] == "../dvc-store", "relative to .dvc/: the clone's own dvc-store/"
    # Without verify, DVC checks out a corrupted remote object as it is, and `dvc status` then says
    # "up to date": the hashes are only checked on pull when this is on.
    assert remote["verify"] == "true"
    gitignored = subprocess.run(["git", "check-ignore", "-q", "dvc-store/files"], cwd=ROOT).returncode == 0
    assert not gitignored, "dvc-store/ must be committed to git"


def test_store_holds_every_output_dvc_lock_names():
    needed = named_objects(STORE, (ROOT / "dvc.lock").read_text())
    missing = sorted(path for md5, path in needed.items() if not store_object(STORE, md5).is_file())
    assert not missing, f"dvc-store/ lacks {len(missing)} outputs of dvc.lock (e.g. {missing[0]}); {REPUBLISH}"


def test_store_holds_nothing_else():
    stale = held_objects(STORE) - set(named_objects(STORE, (ROOT / "dvc.lock").read_text()))
    assert not stale, f"dvc-store/ holds {len(stale)} objects dvc.lock does not name; {REPUBLISH} (it prunes them)"


def test_store_objects_match_their_hashes():
    """What `verify = true` checks on every pull, checked here on the committed copy."""
    corrupt = [
        md5 for md5 in sorted(held_objects(STORE))
        if hashlib.md5(store_object(STORE, md5).read_bytes()).hexdigest() != md5.removesuffix(".dir")
    ]
    assert not corrupt, f"dvc-store/ objects whose content does not match their hash: {corrupt[:3]}; {REPUBLISH}"


def test_published_files_load_without_pickle():
    lock_text = (ROOT / "dvc.lock").read_text()
    files = {path: md5 for md5, path in named_objects(STORE, lock_text).items() if not md5.endswith(".dir")}
    assert len(files) > 4000  # every image of the digits data and of the synthetic outliers
    unsafe = sorted(p for p in files if Path(p).suffix not in SAFE_SUFFIXES)
    assert not unsafe, f"outputs that may need unpickling: {unsafe}"
    for path, md5 in files.items():
        obj = store_object(STORE, md5)
        if path.endswith(".npz"):
            with np.load(obj, allow_pickle=False) as arrays:  # raises on an object (pickled) array
                for key in arrays.files:
                    assert arrays[key].dtype != object, (path, key)
        elif path.endswith(".safetensors"):
            with safe_open(str(obj), framework="pt") as weights:
                assert list(weights.keys()), path
        elif path.endswith(".json"):
            json.loads(obj.read_text())


def test_published_stages_leave_out_third_party_data():
    stages = ["prepare", "embed", "train-cvpn", "sample", "synthesize", "train-classifier", "evaluate"]
    assert published_stages("digits", stages) == stages
    for benchmark in ("cifar100", "imagenet100"):
        assert published_stages(benchmark, stages) == stages[1:]


# --------------------------------------------------------------------------- slow: a fresh clone


def fresh_clone(path: Path, home: Path) -> Repo:
    """`git clone` of this repository's committed HEAD: what a user or CI gets."""
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    home.mkdir(exist_ok=True)
    clone = Repo(path, _env(home))
    subprocess.run(["git", "clone", "-q", str(ROOT), str(path)], check=True, env=clone.env)
    clone.git("checkout", "-q", head)
    assert not (path / "outputs").exists()
    return clone


def run_failing(repo: Repo, *args: str) -> subprocess.CompletedProcess:
    done = subprocess.run(args, cwd=repo.path, env=repo.env, capture_output=True, text=True, timeout=300)
    assert done.returncode != 0, f"{' '.join(args)} should have failed:\n{done.stdout}{done.stderr}"
    return done


def file_md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def pulled(tmp_path_factory):
    """A fresh clone after `dvc pull`. Tests that change it put it back."""
    base = tmp_path_factory.mktemp("remote")
    clone = fresh_clone(base / "clone", base / "home")
    clone.dvc("pull", timeout=600)
    return clone


@pytest.mark.slow
def test_pull_brings_every_output_and_the_workspace_is_up_to_date(pulled):
    outs = lock_outs((pulled.path / "dvc.lock").read_text())
    stages = yaml.safe_load((pulled.path / "dvc.lock").read_text())["stages"]
    assert set(stages) == set(yaml.safe_load((pulled.path / "dvc.yaml").read_text())["stages"])
    for path, md5 in outs.items():
        target = pulled.path / path
        assert target.is_dir() if md5.endswith(".dir") else file_md5(target) == md5, path
    status = pulled.dvc("status")
    assert UP_TO_DATE in status, f"a fresh clone differs from dvc.lock after `dvc pull`; {REPUBLISH}:\n{status}"
    cloud = pulled.dvc("status", "--cloud")
    assert "Cache and remote 'digits' are in sync" in cloud, cloud


@pytest.mark.slow
def test_repro_runs_nothing_and_evaluate_reproduces_the_metrics(pulled):
    output = pulled.dvc("repro")
    assert ran_stages(output) == [] and UP_TO_DATE in output, output

    metrics = pulled.path / "outputs" / "metrics.json"
    locked = lock_outs((pulled.path / "dvc.lock").read_text())
    metrics.unlink()
    shutil.rmtree(pulled.path / "outputs" / "plots")
    pulled.run("ncis", "evaluate", "--no-tracking")
    assert file_md5(metrics) == locked["outputs/metrics.json"], "the pulled classifier no longer gives the published metrics"
    assert UP_TO_DATE in pulled.dvc("status")  # the plots too, byte for byte

    shown = json.loads(pulled.dvc("metrics", "show", "--json"))
    report = next(iter(shown.values()))["data"]["outputs/metrics.json"]["data"]
    assert report == json.loads(metrics.read_text())


@pytest.mark.slow
def test_metrics_diff_against_a_tagged_release(pulled):
    pulled.git("tag", "published")
    params = pulled.params()
    params["evaluate"]["score"] = "msp"
    params["tracking"]["enabled"] = False  # not a stage parameter: only keeps the test off MLflow
    (pulled.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        assert ran_stages(pulled.dvc("repro")) == ["evaluate"]
        diff = json.loads(pulled.dvc("metrics", "diff", "published", "--json"))["outputs/metrics.json"]
        assert set(diff["average.auroc"]) == {"old", "new", "diff"}
        assert diff["average.auroc"]["old"] != diff["average.auroc"]["new"]
        assert "evaluate.score" in pulled.dvc("params", "diff", "published")
    finally:
        pulled.git("checkout", "-q", "params.yaml", "dvc.lock")
        pulled.dvc("checkout", "--force")
        pulled.git("tag", "-d", "published")
    assert UP_TO_DATE in pulled.dvc("status")


@pytest.mark.slow
def test_a_tampered_workspace_file_is_reported_and_restored(pulled):
    weights = pulled.path / "outputs" / "cvpn" / "model.safetensors"
    original = weights.read_bytes()
    weights.chmod(0o644)
    weights.write_bytes(original[:-8] + bytes(8))
    status = pulled.dvc("status")
    assert "train-cvpn" in status and "modified" in status and UP_TO_DATE not in status, status
    pulled.dvc("checkout", "--force", "train-cvpn")
    assert weights.read_bytes() == original
    assert UP_TO_DATE in pulled.dvc("status")


@pytest.mark.slow
def test_a_tampered_remote_object_is_refused_on_pull(tmp_path):
    clone = fresh_clone(tmp_path / "clone", tmp_path / "home")
    store = clone.path / "dvc-store"
    md5 = lock_outs((clone.path / "dvc.lock").read_text())["outputs/classifier"]
    weights = next(e["md5"] for e in manifest(store, md5) if e["relpath"] == "model.safetensors")
    obj = store_object(store, weights)
    obj.chmod(0o644)
    obj.write_bytes(obj.read_bytes()[:-8] + bytes(8))

    run_failing(clone, sys.executable, "-m", "dvc", "pull", "train-classifier")
    assert not (clone.path / "outputs" / "classifier" / "model.safetensors").exists()
    assert not store_object(clone.path / ".dvc" / "cache", weights).exists(), "a corrupted object reached the cache"


# --------------------------------------------------------------------------- slow: ncis publish


@pytest.mark.slow
def test_publish_pushes_every_output_to_another_remote(pulled, tmp_path):
    remote = tmp_path / "second"
    pulled.dvc("remote", "add", "--local", "second", str(remote))  # a user's own remote: .dvc/config untouched
    output = pulled.run("ncis", "publish", "--remote", "second")
    assert f"holds every output of {', '.join(STAGES)}" in output
    assert "in sync" in pulled.dvc("status", "--cloud", "--remote", "second")
    assert held_objects(remote) == held_objects(pulled.path / "dvc-store")
    assert not pulled.git("status", "--porcelain").strip(), "publishing to another remote changed tracked files"

    # A file lost from a folder the remote lists: `dvc push` would not notice, the check does.
    lock = (pulled.path / "dvc.lock").read_text()
    image = next(md5 for md5, path in named_objects(remote, lock).items() if path.startswith("outputs/synthesize/images/"))
    store_object(remote, image).unlink()
    done = run_failing(pulled, "ncis", "publish", "--remote", "second")
    assert done.returncode == 2 and done.stderr.count("\n") == 1
    assert "remote 'second' lacks 1 files (e.g. outputs/synthesize/images/" in done.stderr


@pytest.mark.slow
def test_publish_for_a_real_benchmark_keeps_prepare_local(pulled, tmp_path):
    """CIFAR-100 / ImageNet images must not be redistributed: prepare's outputs stay out."""
    script = "from pathlib import Path; from ncis.publish import publish; publish(Path('.'), 'cifar100', remote={!r})"
    refused = run_failing(pulled, sys.executable, "-c", script.format("digits"))
    assert "UserError: remote 'digits' is a folder inside the repository" in refused.stderr  # GBs do not go into git

    remote = tmp_path / "third"
    pulled.dvc("remote", "add", "--local", "third", str(remote))
    pulled.run(sys.executable, "-c", script.format("third"))
    store = pulled.path / "dvc-store"

    def objects(md5: str) -> set[str]:
        """An output's objects: a file's, or a folder's listing and files."""
        return {md5} | ({e["md5"] for e in manifest(store, md5)} if md5.endswith(".dir") else set())

    outs = lock_outs((pulled.path / "dvc.lock").read_text())
    prepare_outs = ("outputs/data", "outputs/diffusion")
    prepare = set().union(*(objects(outs[p]) for p in prepare_outs))
    others = set().union(*(objects(md5) for p, md5 in outs.items() if p not in prepare_outs))
    assert len(prepare - others) > 3000  # the digits images and the tiny model
    assert others <= held_objects(remote)
    assert not (prepare - others) & held_objects(remote)
    assert "in sync" in pulled.dvc("status", "--cloud", "--remote", "third", "embed", "evaluate")


@pytest.mark.slow
def test_publish_refuses_a_workspace_that_differs_from_dvc_lock(pulled, tmp_path):
    pulled.dvc("remote", "add", "--local", "fourth", str(tmp_path / "fourth"))
    params = pulled.params()
    params["evaluate"]["score"] = "msp"
    (pulled.path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        done = run_failing(pulled, "ncis", "publish", "--remote", "fourth")
    finally:
        pulled.git("checkout", "-q", "params.yaml")
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.count("\n") == 1 and "differs from dvc.lock (evaluate" in done.stderr and "dvc repro" in done.stderr
    assert not (tmp_path / "fourth").exists(), "nothing is pushed from a workspace dvc.lock does not describe"

    # --prune on a remote outside the repository: refused before anything is pushed or removed
    done = run_failing(pulled, "ncis", "publish", "--remote", "fourth", "--prune")
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "inside the repository" in done.stderr
    assert not (tmp_path / "fourth").exists()


@pytest.mark.slow
def test_publish_prune_leaves_the_store_holding_exactly_dvc_lock(pulled):
    store = pulled.path / "dvc-store"
    kept = held_objects(store)
    stray = store_object(store, "0" * 32)  # an output of an older dvc.lock
    stray.parent.mkdir(parents=True, exist_ok=True)
    stray.write_bytes(b"older result")
    try:
        pulled.run("ncis", "publish", "--prune")
        assert held_objects(store) == kept
        assert not pulled.git("status", "--porcelain").strip()
        assert UP_TO_DATE in pulled.dvc("status")  # the local cache still holds the workspace's outputs
    finally:
        stray.unlink(missing_ok=True)
