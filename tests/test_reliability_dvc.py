"""`dvc repro` stopped by Ctrl-C or by a scheduler's SIGTERM (sent to the whole job, as a terminal
or Slurm does): the stage is left not done in `dvc status`, nothing half-written lies under its
outputs, and the next `dvc repro` finishes it."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import yaml
from faults import ROOT, child_env, debris, default_signals, readable

pytestmark = pytest.mark.slow

PROJECT_FILES = ["ncis", "dvc.yaml", "params.yaml", "pyproject.toml", ".gitignore", ".dvcignore"]
PREPARE = {
    "device": "cpu",
    "data": {"ood_size": 10},
    "diffusion": {"train_steps": 150, "train_batch_size": 32, "unet_channels": [8, 16], "text_width": 16},
    "tracking": {"enabled": False},
}


def dvc_env(home) -> dict:
    env = child_env(HOME=str(home), DVC_NO_ANALYTICS="1", GIT_CONFIG_NOSYSTEM="1",
                    GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.invalid",
                    GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.invalid")
    env["PATH"] = f"{os.path.dirname(sys.executable)}{os.pathsep}{env['PATH']}"  # the stage's `ncis`
    return {k: v for k, v in env.items() if not k.startswith(("DVC_SITE", "DVC_GLOBAL", "GIT_DIR"))}


@pytest.fixture
def repo(tmp_path):
    path = tmp_path / "project"
    path.mkdir()
    for name in PROJECT_FILES:
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, path / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
        else:
            shutil.copy2(source, path / name)
    params = yaml.safe_load((path / "params.yaml").read_text())
    for key, value in PREPARE.items():
        params[key] = {**params[key], **value} if isinstance(value, dict) else value
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**dvc_env(tmp_path / "home"), "PYTHONPATH": str(path)}
    (tmp_path / "home").mkdir()
    for command in (["git", "init", "-q"], [sys.executable, "-m", "dvc", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "p"]):
        subprocess.run(command, cwd=path, env=env, check=True, capture_output=True)
    return path, env


def dvc(repo, *args, timeout=600) -> subprocess.CompletedProcess:
    path, env = repo
    return subprocess.run([sys.executable, "-m", "dvc", *args], cwd=path, env=env, capture_output=True, text=True, timeout=timeout)


def wait_for_group(group: int, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            os.killpg(group, 0)
        except ProcessLookupError:
            return
        assert time.monotonic() < deadline, f"process group {group} still running"
        time.sleep(0.1)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_stopped_dvc_stage_stays_not_done_and_reruns(repo, tmp_path, signum):
    path, env = repo
    log = tmp_path / "repro.log"
    job = subprocess.Popen([sys.executable, "-m", "dvc", "repro", "prepare"], cwd=path, env=env,
                           stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True,
                           preexec_fn=default_signals())
    deadline = time.monotonic() + 600
    while "prepare: tiny diffusion model" not in log.read_text(errors="replace"):
        assert job.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
        time.sleep(0.1)
    time.sleep(1.0)  # into the training loop
    os.killpg(job.pid, signum)  # dvc and its `ncis prepare`, as Ctrl-C in a terminal or a scheduler
    assert job.wait(timeout=120) != 0
    wait_for_group(job.pid)  # on SIGTERM dvc ends at once; its `ncis prepare` is still cleaning up
    output = log.read_text(errors="replace")
    assert f"ncis: stopped by {signal.Signals(signum).name} during stage prepare; " in output, readable(output)

    status = dvc(repo, "status")
    assert status.returncode == 0 and "prepare:" in status.stdout and "up to date" not in status.stdout, status.stdout
    assert not (path / "outputs" / "diffusion").exists() and debris(path / "outputs") == []
    assert not (path / "dvc.lock").exists()

    rerun = dvc(repo, "repro", "prepare")
    assert rerun.returncode == 0, (rerun.stdout + rerun.stderr)[-3000:]
    assert "prepare:" not in dvc(repo, "status").stdout
