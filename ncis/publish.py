"""`ncis publish`: hand the outputs `dvc.lock` records to users through a DVC remote.

What a maintainer runs after `dvc repro` (docs/dvc.md, "Pretrained artifacts"). The real `dvc`
CLI does every step, run with this interpreter (`python -m dvc`), so the push, the garbage
collection and the check are exactly DVC's. Then the MLflow registry's `published` alias is
pointed at the pushed classifier's model (docs/tracking.md, "The model registry").
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

from ncis.errors import UserError, one_line

# The only stage whose outputs are third-party data for the real benchmarks (CIFAR-100,
# ImageNet, the OOD sets): their licences forbid redistributing them. digits' are generated here.
THIRD_PARTY_DATA_STAGE = "prepare"
OWN_DATA_BENCHMARKS = frozenset({"digits"})


def add_arguments(parser) -> None:
    parser.add_argument("--remote", default=None, metavar="NAME", help="DVC remote to push to (default: the default remote)")
    parser.add_argument(
        "--prune",
        action="store_true",
        help="afterwards remove from the remote (and the local cache) what dvc.lock no longer names "
        "(`dvc gc --workspace --cloud`); only for a remote folder inside the repository",
    )


def published_stages(benchmark: str, stages: list[str]) -> list[str]:
    """The stages whose outputs go to the remote: all of them, but `prepare` for the real benchmarks."""
    return [s for s in stages if s != THIRD_PARTY_DATA_STAGE or benchmark in OWN_DATA_BENCHMARKS]


def publish(root: Path, benchmark: str, remote: str | None = None, prune: bool = False) -> list[str]:
    """Push the published stages' outputs to `remote`; return those stages."""
    # DVC remembers what it pushed (a remote index in its site cache) and `push` trusts that
    # memory: a file deleted from the remote since would not be pushed again. A fresh site cache
    # makes it ask the remote itself.
    previous = os.environ.get("DVC_SITE_CACHE_DIR")
    with tempfile.TemporaryDirectory(prefix="ncis-publish-") as site_cache:
        os.environ["DVC_SITE_CACHE_DIR"] = site_cache  # read by the `dvc` commands run below
        try:
            return _publish(Path(root), benchmark, remote, prune)
        finally:
            if previous is None:
                os.environ.pop("DVC_SITE_CACHE_DIR")
            else:
                os.environ["DVC_SITE_CACHE_DIR"] = previous


def _publish(root: Path, benchmark: str, remote: str | None, prune: bool) -> list[str]:
    # 1. Check: only what dvc.lock describes (anything else would reach users under a wrong
    # description), and a remote that fits.
    stages = pipeline_stages(root)
    require_up_to_date(root)
    name, url = resolve_remote(root, remote)
    if benchmark not in OWN_DATA_BENCHMARKS and inside(url, root):
        raise UserError(
            f"remote {name!r} is a folder inside the repository, sized for digits; push {benchmark}'s outputs to "
            "a remote of their own (`dvc remote add --default storage s3://...`, docs/dvc.md) or pass --remote NAME"
        )
    if prune and not inside(url, root):
        # On a shared bucket, gc would delete other branches' and tags' outputs.
        raise UserError(
            f"--prune removes everything this workspace does not use from {url}, other branches' outputs included; "
            "use it only on a remote folder inside the repository (elsewhere: `dvc gc --cloud --all-branches --all-tags`)"
        )
    targets = published_stages(benchmark, stages)
    # 2. Push.
    print(f"publish: pushing {', '.join(targets)} to remote {name!r} ({url})", flush=True)
    print("publish: " + last_line(dvc(root, "push", "--remote", name, *targets)), flush=True)
    # 3. Prune (DVC's gc prunes the local cache too: DVC has no remote-only gc).
    if prune:
        print("publish: " + last_line(dvc(root, "gc", "--workspace", "--cloud", "--remote", name, "--force")), flush=True)
    # 4. Check what users will pull, file by file.
    require_in_remote(root, name, targets)
    print(f"publish: remote {name!r} holds every output of {', '.join(targets)}", flush=True)
    return targets


def main(args) -> None:
    """`ncis publish [--remote NAME] [--prune]`, from the project's root."""
    from ncis.config import load_params

    root = Path.cwd()
    params = load_params(None)
    publish(root, params.benchmark, remote=args.remote, prune=args.prune)
    if params.tracking.enabled:
        alias_published(root, params)
    print("publish: now commit dvc.lock (and the remote folder if the repository holds it) so that clones pull these")


def alias_published(root: Path, params) -> None:
    """5. `models:/ncis-<benchmark>-classifier@published`: the registered version of the classifier
    dvc.lock records. Only a note where the tracking store cannot say which: the outputs are
    published either way."""
    import mlflow
    from mlflow.exceptions import MlflowException

    from ncis import tracking
    from ncis.layout import layout_for

    classifier = Path(os.path.relpath(root / layout_for(params).classifier, root)).as_posix()
    digest = tracking.dvc_output_hashes(root / "dvc.lock").get(classifier)
    store = mlflow.get_tracking_uri()
    try:
        missing = tracking.missing_local_store()
        if missing is not None:
            raise UserError(f"no MLflow store at {missing}")
        tracking.check_server("or set tracking.enabled: false in the params file")
        uri = tracking.alias_classifier(params.benchmark, digest) if digest else None
    except (UserError, MlflowException) as err:
        print(f"publish: note: registry alias {tracking.PUBLISHED_ALIAS!r} not set: {one_line(err)}", file=sys.stderr)
        return
    if uri is None:
        print(
            f"publish: note: registry alias {tracking.PUBLISHED_ALIAS!r} not set: no run in {store} logged dvc.lock's {classifier} "
            f"({digest}); it is set once `dvc repro` or `ncis run` with tracking on has logged it here",
            file=sys.stderr,
        )
        return
    print(f"publish: {uri} is dvc.lock's {classifier} ({digest})", flush=True)


def dvc(root: Path, *args: str) -> str:
    """Run `dvc args` in `root`; its standard output, or a UserError naming the command and DVC's error."""
    done = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=root, capture_output=True, text=True)
    if done.returncode != 0:
        output = (done.stdout + done.stderr).strip().splitlines()
        errors = [line for line in output if line.startswith("ERROR")]
        reason = (errors or output or ["no output"])[0].removeprefix("ERROR: ")
        raise UserError(f"`dvc {' '.join(args)}` failed: {reason}")
    return done.stdout.strip()


def last_line(output: str) -> str:
    lines = output.splitlines()
    return lines[-1] if lines else "done"


def pipeline_stages(root: Path) -> list[str]:
    dvc_yaml = root / "dvc.yaml"
    if not dvc_yaml.is_file():
        raise UserError(f"no dvc.yaml in {root}; run `ncis publish` from the project's root")
    return list(yaml.safe_load(dvc_yaml.read_text())["stages"])


def require_up_to_date(root: Path) -> None:
    changed = json.loads(dvc(root, "status", "--json") or "{}")
    if changed:
        raise UserError(
            f"the workspace differs from dvc.lock ({', '.join(sorted(changed))}: see `dvc status`); "
            "run `dvc repro` (or `dvc checkout`) first, then publish"
        )


def resolve_remote(root: Path, remote: str | None) -> tuple[str, str]:
    """(name, url) of `remote`, or of the default remote; URLs as DVC resolves them (absolute paths)."""
    # DVC's own config (project, local and user files merged), not `dvc remote list`'s table, which
    # wraps a long URL onto the next line at the terminal's width.
    from dvc.repo import Repo

    with Repo(str(root)) as repo:
        urls = {name: str(section["url"]) for name, section in repo.config["remote"].items()}
        default = repo.config["core"].get("remote")
    name = remote or default
    if name not in urls:
        known = ", ".join(sorted(urls)) or "none"
        raise UserError(
            f"no DVC remote {name or '(default)'} (configured: {known}); pass --remote NAME or add one with "
            "`dvc remote add -d NAME URL`"
        )
    return name, urls[name]


def inside(url: str, root: Path) -> bool:
    """Whether `url` is a local folder inside `root`."""
    if "://" in url:
        return False
    return Path(url).resolve().is_relative_to(root.resolve())


def locked_outputs(root: Path, stages: list[str]) -> list[str]:
    """The output paths dvc.lock records for `stages`."""
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    return [out["path"] for stage in stages for out in lock[stage]["outs"]]


def require_in_remote(root: Path, name: str, stages: list[str]) -> None:
    """Every file of the stages' outputs is in the remote, folders file by file (`dvc status
    --cloud` takes a folder whose listing the remote holds as complete)."""
    # `dvc data status` takes paths, not stage names.
    paths = locked_outputs(root, stages)
    report = json.loads(dvc(root, "data", "status", "--not-in-remote", "--granular", "--remote", name, "--json", *paths) or "{}")
    missing = report.get("not_in_remote", [])
    if missing:
        raise UserError(
            f"remote {name!r} lacks {len(missing)} files (e.g. {missing[0]}); `dvc push` skips a folder whose "
            "listing (.dir object) the remote holds: delete that object from the remote (dvc-store/: the whole "
            "folder) and publish again"
        )
