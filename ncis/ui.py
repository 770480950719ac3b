"""`ncis ui`: the MLflow UI on the project's tracking store, opened where the results are.

MLflow's UI opens an experiment on its GenAI overview unless told otherwise (`workflowType`,
remembered per browser, whatever the experiment's kind tag says). This starts `mlflow ui` on the
store every stage logs to (`MLFLOW_TRACKING_URI`, else MLflow's local default), waits until it
answers, and prints (and opens, where there is a display) the benchmark's runs table with the
`ncis` view: pipelines sorted by average AUROC, `workflowType=machine_learning`. On a tracking
server nothing is started: the link is printed. Ctrl-C (or SIGTERM) stops the server and its
workers. docs/tracking.md, "The MLflow UI".
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import webbrowser
from pathlib import Path

from ncis.errors import UserError

START_TIMEOUT_S = 180  # a cold `mlflow ui` takes seconds, far longer on a loaded machine


def add_arguments(parser) -> None:
    parser.add_argument("--experiment", default=None, help="MLflow experiment (default: $MLFLOW_EXPERIMENT_NAME, else the benchmark of --params)")
    parser.add_argument("--params", default=None, metavar="FILE", help="parameter file naming the benchmark (default: params.yaml)")
    parser.add_argument("--host", default="127.0.0.1", help="address to serve on (default: 127.0.0.1, this machine only)")
    parser.add_argument("--port", type=int, default=5000, help="port to serve on (default: 5000)")
    parser.add_argument("--no-browser", action="store_true", help="only print the link, even where a browser could open it")


def main(args) -> None:
    import mlflow

    from ncis import tracking

    # 1. The store and the experiment, checked before anything starts.
    name = args.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or _benchmark(args.params)
    store = mlflow.get_tracking_uri()
    tracking.check_server("or run `ncis ui` without MLFLOW_TRACKING_URI, on the local store")
    missing = tracking.missing_local_store()
    if missing is not None:
        raise UserError(f"no MLflow store at {missing}; run the pipeline first (`make demo`, `ncis run`) here, or set MLFLOW_TRACKING_URI")
    experiment = mlflow.MlflowClient().get_experiment_by_name(name)
    if experiment is None:
        raise UserError(f"no MLflow experiment {name!r} in {store}; run the pipeline first (`make demo`, `ncis run`) or pass --experiment NAME")
    if store.startswith(("http://", "https://")):  # a server is already up: only the link
        _show(tracking.runs_table_url(experiment.experiment_id), args.no_browser)
        return
    # 2. The server, then the link once it answers; 3. until Ctrl-C.
    address = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    _require_free(args.host, args.port)
    with tempfile.NamedTemporaryFile("w+", prefix="ncis-ui-", suffix=".log") as log:
        server = _start(store, args.host, args.port, log)
        try:
            _wait_until_up(server, address, log)
            _show(tracking.runs_table_url(experiment.experiment_id, address), args.no_browser)
            print("ui: Ctrl-C stops it", flush=True)
            returncode = server.wait()
            raise UserError(f"the MLflow UI stopped by itself (exit {returncode}): {_last_line(log)}")
        except KeyboardInterrupt:
            print("ui: MLflow UI stopped", flush=True)
        finally:
            _stop(server)


def _benchmark(params_file: str | None) -> str:
    from ncis.config import load_params

    return load_params(params_file).benchmark


def _require_free(host: str, port: int) -> None:
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            probe.bind((host, port))
        except OSError as err:
            raise UserError(f"cannot serve on {host}:{port} ({err.strerror}: another `ncis ui` or `mlflow ui`?); pass --port N") from None


def _start(store: str, host: str, port: int, log) -> subprocess.Popen:
    """`mlflow ui` in a process group of its own: Ctrl-C reaches only ncis, which stops the whole group.
    MLflow's background job runner (GenAI jobs) is off unless MLFLOW_SERVER_ENABLE_JOB_EXECUTION
    says otherwise: it only slows the start. One worker: a UI for one user."""
    command = [sys.executable, "-m", "mlflow", "ui", "--backend-store-uri", store, "--host", host, "--port", str(port), "--workers", "1"]
    env = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **os.environ}
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True)


def _wait_until_up(server: subprocess.Popen, address: str, log) -> None:
    import urllib.error
    import urllib.request

    deadline = time.monotonic() + START_TIMEOUT_S
    while True:
        if server.poll() is not None:
            raise UserError(f"`mlflow ui` exited ({server.returncode}) before answering: {_last_line(log)}")
        try:
            with urllib.request.urlopen(f"{address}/health", timeout=2) as answer:
                if answer.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise UserError(f"`mlflow ui` did not answer at {address} within {START_TIMEOUT_S} s: {_last_line(log)}")
        time.sleep(0.3)


def _show(url: str, no_browser: bool) -> None:
    print(f"ui: runs table (sorted by average AUROC): {url}", flush=True)
    if not no_browser and _has_browser():
        webbrowser.open(url)


def _has_browser() -> bool:
    """A graphical browser to open: not on a headless machine, where Python would start a text-mode
    one (lynx, w3m) in this terminal. $BROWSER names one explicitly."""
    if os.environ.get("BROWSER"):
        return True
    return sys.platform in ("darwin", "win32") or bool(os.environ.get("DISPLAY") or os.environ.get("WAYLAND_DISPLAY"))


def _last_line(log) -> str:
    lines = Path(log.name).read_text(errors="replace").strip().splitlines()
    return lines[-1][:300] if lines else "no output"


def _stop(server: subprocess.Popen, grace_s: float = 10) -> None:
    """SIGTERM the server's process group (uvicorn and its workers), SIGKILL what is left of it after `grace_s`."""
    deadline = time.monotonic() + grace_s
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(server.pid, sig)
        except ProcessLookupError:
            break
        while time.monotonic() < deadline:
            server.poll()  # reaps the group's leader, which would otherwise still count as a member
            try:
                os.killpg(server.pid, 0)
            except ProcessLookupError:
                return
            time.sleep(0.1)
    server.wait()
