"""Helpers of the fault-injection tests: real `ncis` processes, real signals, real limits.

Imported by the test_reliability_* modules (pytest puts this folder on sys.path).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import random
import re
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from conftest import TINY_PIPELINE

ROOT = Path(__file__).resolve().parents[1]

# Every stage in seconds (as tests/test_pipeline.py), on the CPU, without MLflow.
TINY = [
    "device=cpu",
    "tracking.enabled=false",
    *TINY_PIPELINE,
    "cvpn.hidden=16",
    "classifier.max_outliers=100",
]


# Resume state a stopped or failed stage keeps on purpose (ncis/resume.py): a rerun reuses it or drops it.
RESUME_STATE = ("diffusion_checkpoints", "embed/chunks", "cvpn_checkpoints", "synthesize_batches", "classifier_checkpoints")


def sets(overrides: list[str]) -> list[str]:
    return [arg for override in overrides for arg in ("--set", override)]


def child_env(**more: str) -> dict[str, str]:
    """The environment of an `ncis` child: this checkout's package, one thread, no MLflow settings."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", TQDM_MININTERVAL="0.5")
    env.update(more)
    return env


def default_signals(then=None):
    """preexec_fn: the child handles SIGINT/SIGTERM/SIGHUP itself, even when the tests run where
    they are ignored (a background job of a shell without job control ignores SIGINT)."""

    def apply() -> None:
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, signal.SIG_DFL)
        if then is not None:
            then()

    return apply


class Child:
    """`python -m ncis ...` in its own session (a signal reaches it alone), output to a file."""

    def __init__(self, args: list[str], cwd: Path, env: dict | None = None, prefix: list[str] = (), preexec_fn=None):
        self.log = Path(cwd) / f"child-{time.monotonic_ns()}.log"
        self.process = subprocess.Popen(
            [*prefix, sys.executable, "-m", "ncis", *args],
            cwd=cwd,
            env=env or child_env(),
            stdout=open(self.log, "w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=default_signals(preexec_fn),
        )

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, pattern: str, timeout: float = 300) -> None:
        """Until `pattern` (a regex) shows in the output; fails if the child ends first."""
        deadline = time.monotonic() + timeout
        while not re.search(pattern, self.output):
            if self.process.poll() is not None:
                raise AssertionError(f"ended ({self.process.returncode}) before {pattern!r}:\n{readable(self.output)}")
            if time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"no {pattern!r} after {timeout} s:\n{readable(self.output)}")
            time.sleep(0.1)

    def signal(self, signum: int) -> bool:
        """Send `signum`; False if the child had already ended."""
        if self.process.poll() is not None:
            return False
        self.process.send_signal(signum)
        return True

    def wait(self, timeout: float = 300) -> int:
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"still running after {timeout} s:\n{readable(self.output)}") from None

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def run_ncis(args: list[str], cwd: Path, timeout: float = 600, **kwargs) -> tuple[int, str]:
    child = Child(args, cwd, **kwargs)
    code = child.wait(timeout)
    return code, child.output


def readable(output: str, chars: int = 3000) -> str:
    """The end of `output` with each progress bar reduced to its last state."""
    lines = [line.rsplit("\r", 1)[-1] for line in output.split("\n")]
    return "\n".join(lines)[-chars:]


def ncis_lines(output: str, kind: str = "") -> list[str]:
    """The `ncis: <kind>...` messages in `output`, also where one follows a progress bar on its line."""
    return re.findall(rf"ncis: {kind}[^\r\n]*", output)


def error_lines(output: str) -> list[str]:
    return ncis_lines(output, "error:")


def assert_one_line_error(output: str, *fragments: str) -> str:
    """Exactly one `ncis: error:` line, holding every fragment, and no traceback."""
    assert "Traceback" not in output, readable(output)
    lines = error_lines(output)
    assert len(lines) == 1, readable(output)
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


def digests(folder: Path, skip: tuple[str, ...] = ()) -> dict[str, str]:
    """Relative path -> md5 of every file below `folder`, but those whose path starts with `skip`."""
    found = {}
    for path in sorted(Path(folder).rglob("*")):
        relative = str(path.relative_to(folder))
        if path.is_file() and not relative.startswith(skip):
            found[relative] = hashlib.md5(path.read_bytes()).hexdigest()
    return found


def debris(folder: Path) -> list[Path]:
    """Temporary names of atomic writes anywhere below `folder` (what a killed writer leaves)."""
    return [p for p in Path(folder).rglob("*") if ".ncis-tmp-" in p.name or p.name.endswith(".ncis-old")]


def copy_outputs(source: Path, target: Path, without: list[str]) -> Path:
    shutil.copytree(source, target, symlinks=True)
    for name in without:
        path = target / name
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    return target


def random_delay(seed_text: str, low: float, high: float) -> float:
    """A random point, reproducible from the test's name (printed, so a failure can be replayed)."""
    delay = random.Random(seed_text).uniform(low, high)
    print(f"{seed_text}: signal after {delay:.2f} s")
    return delay


# ---------------------------------------------------------------- crafted files


class Payload:
    """Unpickling this runs `touch <marker>`: the proof that a loader unpickled."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def write_payload(path: Path, marker: Path, torch_format: bool = False) -> Path:
    """A pickle that touches `marker` when loaded, at `path` (as torch.save would write it, or raw)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if torch_format:
        import torch

        torch.save({"state_dict": {"weight": Payload(marker)}}, path)
    else:
        path.write_bytes(pickle.dumps(Payload(marker)))
    assert not marker.exists()
    return path


def truncate(path: Path, fraction: float = 0.5) -> Path:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


def write_embeddings(path: Path, classes: int = 10, per_class: int = 8, dim: int = 6, seed: int = 0, **changes) -> Path:
    """An embeddings.npz as `ncis embed` writes it, with random vectors; `changes` replace arrays."""
    from ncis.io import save_arrays

    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    arrays = {
        "embeddings": rng.normal(size=(len(labels), dim)).astype(np.float32) + labels[:, None],
        "labels": labels.astype(np.int64),
        "losses": rng.uniform(size=len(labels)).astype(np.float32),
        "class_tokens": rng.normal(size=(classes, dim)).astype(np.float32),
    }
    save_arrays(path, **{**arrays, **changes})
    return path


def write_digit_folder(folder: Path, classes: int = 10, per_class: int = 6, seed: int = 0) -> Path:
    """A small ImageFolder of random 8x8 grey images laid out as `ncis prepare` writes digits."""
    from ncis.datasets import write_image_folder

    rng = np.random.default_rng(seed)
    labels = np.repeat(np.arange(classes), per_class)
    write_image_folder(folder, rng.integers(0, 256, (len(labels), 8, 8, 1), dtype=np.uint8), labels)
    return folder


def limit_file_size(limit_bytes: int):
    """preexec_fn: the child may write no file larger than `limit_bytes` (EFBIG past it; Python ignores SIGXFSZ)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit_bytes, limit_bytes))

    return apply


def without_root_privileges() -> list[str] | None:
    """Command prefix under which root obeys file permissions (no CAP_DAC_OVERRIDE); [] for other
    users; None if root cannot shed them here."""
    if os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        return None
    prefix = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]
    probe = subprocess.run([*prefix, "true"], capture_output=True)
    return prefix if probe.returncode == 0 else None


SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}


# ---------------------------------------------------------------- a tracking server of one's own


class MlflowServer:
    """A real `mlflow server` (SQLite, local artifacts) in its own process group, to be killed."""

    def __init__(self, root: Path, timeout: float = 180):
        import requests

        from conftest import free_port  # the session server's helpers

        root.mkdir(parents=True, exist_ok=True)
        port = free_port()
        self.uri = f"http://127.0.0.1:{port}"
        self.log = root / "server.log"
        self.process = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server",
             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
             "--artifacts-destination", str(root / "artifacts"),
             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
            stdout=open(self.log, "w"), stderr=subprocess.STDOUT,
            env={**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
            start_new_session=True,
        )
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.kill()
                raise AssertionError(f"mlflow server did not start:\n{self.log.read_text()[-3000:]}")
            try:
                if requests.get(self.uri + "/health", timeout=2).ok:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.2)

    def kill(self) -> None:
        """SIGKILL the whole server (its uvicorn workers too): no goodbye to the clients."""
        try:
            os.killpg(self.process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.process.wait()
