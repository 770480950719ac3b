"""A tracking server that fails mid-stage costs no work: the stage writes its outputs, the lost
logging is one line. A stopped stage's MLflow run is KILLED. (A real `mlflow server`, per test.)
"""

from __future__ import annotations

import re
import signal

import pytest
from faults import ROOT, TINY, Child, MlflowServer, child_env, digests, ncis_lines, sets, write_embeddings

from ncis.cli import main
from ncis.layout import Layout

pytestmark = pytest.mark.slow

EPOCHS = 300
PROGRESS = rf"train-cvpn:.*?(\d+)/{EPOCHS} \["


def stage_args(outputs, *more):
    return ["train-cvpn", "--params", str(ROOT / "params.yaml"), *sets([f"outputs={outputs}", *TINY, f"cvpn.epochs={EPOCHS}", *more])]


def wait_for_epoch(child: Child, epoch: int) -> None:
    child.wait_for(PROGRESS)
    while max(int(n) for n in re.findall(PROGRESS, child.output)) < epoch:
        child.wait_for(PROGRESS, timeout=120)


@pytest.fixture
def server(tmp_path):
    server = MlflowServer(tmp_path / "mlflow")
    yield server
    server.kill()


def tracked_env(server: MlflowServer) -> dict:
    # No retries: MLflow's default (7, with backoff) would wait ~4 minutes per failed call.
    return child_env(MLFLOW_TRACKING_URI=server.uri, MLFLOW_HTTP_REQUEST_MAX_RETRIES="0", MLFLOW_HTTP_REQUEST_TIMEOUT="10")


def test_a_stopped_stage_is_killed_in_mlflow_and_a_lost_server_costs_no_outputs(server, tmp_path):
    from mlflow import MlflowClient

    # 1. Ctrl-C mid-stage: exit 130, the stage's run is KILLED, no model written.
    stopped = tmp_path / "stopped"
    write_embeddings(Layout(stopped).embeddings)
    child = Child(stage_args(stopped, "tracking.enabled=true"), tmp_path, env=tracked_env(server))
    wait_for_epoch(child, 5)
    assert child.signal(signal.SIGINT)
    assert child.wait() == 130
    [run] = MlflowClient(server.uri).search_runs([MlflowClient(server.uri).get_experiment_by_name("digits").experiment_id])
    assert run.data.tags["ncis.stage"] == "train-cvpn" and run.info.status == "KILLED"
    assert not Layout(stopped).cvpn.exists()

    # 2. The reference: the same stage without tracking.
    untracked = tmp_path / "untracked"
    write_embeddings(Layout(untracked).embeddings)
    assert main(stage_args(untracked)) == 0

    # 3. The server dies mid-stage: the stage finishes, writes the same model, says so in one line.
    tracked = tmp_path / "tracked"
    write_embeddings(Layout(tracked).embeddings)
    child = Child(stage_args(tracked, "tracking.enabled=true"), tmp_path, env=tracked_env(server))
    wait_for_epoch(child, 20)
    server.kill()
    assert child.wait() == 0, ncis_lines(child.output)
    messages = ncis_lines(child.output)
    assert len(messages) == 1 and messages[0].startswith("ncis: warning: MLflow logging failed ("), messages
    assert "writes its outputs" in messages[0] and "Traceback" not in child.output
    assert digests(Layout(tracked).cvpn) == digests(Layout(untracked).cvpn)
