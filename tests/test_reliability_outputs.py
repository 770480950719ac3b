"""The outputs folder: one writer at a time, and a full disk or a read-only folder costs nothing.

- Two `ncis` processes on one outputs folder: the second is refused in one line naming the
  first; a lock left by a killed process does not block.
- A write that fails for lack of space (a real file-size limit, a real full tmpfs) or permission:
  one line naming the file; inputs and earlier outputs untouched; nothing partial under a final name.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import textwrap

import pytest
from faults import (
    RESUME_STATE,
    ROOT,
    TINY,
    Child,
    assert_one_line_error,
    child_env,
    debris,
    default_signals,
    digests,
    limit_file_size,
    readable,
    run_ncis,
    sets,
    without_root_privileges,
    write_embeddings,
)

from ncis.cli import main
from ncis.errors import UserError
from ncis.layout import Layout
from ncis.lock import LOCK_NAME, outputs_lock

HOLD = textwrap.dedent(
    """
    import sys, time
    from ncis.lock import outputs_lock
    with outputs_lock(sys.argv[1], command="ncis holder"):
        print("held", flush=True)
        time.sleep(600)
    """
)


def hold_lock(outputs) -> subprocess.Popen:
    """Another process holding the lock of `outputs` (as a running `ncis` would)."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(outputs)], env=child_env(), stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def stage_args(stage, outputs, *more):
    return [stage, "--params", str(ROOT / "params.yaml"), *sets([f"outputs={outputs}", *TINY, *more])]


# ---------------------------------------------------------------- the lock (fast)


def test_a_held_lock_refuses_naming_its_holder(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(UserError) as refused:
            with outputs_lock(tmp_path):
                pass
        message = str(refused.value)
        assert f"pid {holder.pid} on {socket.gethostname()}" in message and "`ncis holder`" in message
        assert "--set outputs=" in message and "\n" not in message
    finally:
        holder.kill()
        holder.wait()


def test_a_lock_left_by_a_killed_process_does_not_block(tmp_path):
    holder = hold_lock(tmp_path)
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert (tmp_path / LOCK_NAME).exists() and str(holder.pid) in (tmp_path / LOCK_NAME).read_text()
    with outputs_lock(tmp_path, command="ncis next"):
        assert "ncis next" in (tmp_path / LOCK_NAME).read_text()
    assert not (tmp_path / LOCK_NAME).exists()  # released: removed


def test_a_lock_file_of_garbage_or_a_dead_pid_does_not_block(tmp_path):
    (tmp_path / LOCK_NAME).write_text('{"pid": 999999999, "host": "elsewhere", "command": "ncis run", "started": 0}')
    with outputs_lock(tmp_path):
        pass
    (tmp_path / LOCK_NAME).write_text("\0garbage")
    with outputs_lock(tmp_path):
        pass


def test_the_cli_refuses_a_second_process_before_any_work(tmp_path, capsys):
    outputs = tmp_path / "outputs"
    write_embeddings(Layout(outputs).embeddings)
    before = digests(outputs)
    holder = hold_lock(outputs)
    try:
        assert main(stage_args("train-cvpn", outputs)) == 2
    finally:
        holder.kill()
        holder.wait()
    assert_one_line_error(capsys.readouterr().err, f"outputs folder {outputs} is in use by `ncis holder` (pid {holder.pid} on ")
    assert {k: v for k, v in digests(outputs).items() if k != LOCK_NAME} == before
    assert main(stage_args("train-cvpn", outputs)) == 0  # the holder is gone: its lock is stale


def test_the_cli_sweeps_what_a_killed_writer_left(tmp_path, capsys):
    """A kill between atomic_path's two renames leaves the previous output under a temporary name
    only: the next run puts it back; a half-written temporary folder is removed."""
    outputs = tmp_path / "outputs"
    layout = Layout(outputs)
    write_embeddings(layout.embeddings)
    assert main(stage_args("train-cvpn", outputs)) == 0
    previous = digests(layout.cvpn)
    layout.cvpn.rename(outputs / ".cvpn.ncis-old")
    half = outputs / ".sample.ncis-tmp-x1y2" / "sample"
    half.mkdir(parents=True)
    (half / "outliers.npz").write_bytes(b"PK\3\4 half")
    assert main(stage_args("sample", outputs)) == 0
    assert digests(layout.cvpn) == previous and debris(outputs) == []
    err = capsys.readouterr().err
    assert f"ncis: restored {layout.cvpn} (the previous output), left by an interrupted run" in err
    assert f"ncis: removed {half.parent}, left by an interrupted run" in err


# ---------------------------------------------------------------- two real ncis processes (slow)


@pytest.mark.slow
def test_two_ncis_processes_on_one_outputs_folder(tmp_path):
    outputs = tmp_path / "outputs"
    first = Child(stage_args("prepare", outputs, "diffusion.train_steps=400"), tmp_path)
    first.wait_for(r"prepare: tiny diffusion model")
    code, output = run_ncis(stage_args("prepare", outputs), tmp_path)
    assert code == 2
    line = assert_one_line_error(output, f"outputs folder {outputs} is in use by `ncis prepare ", f"(pid {first.process.pid} on ")
    assert "wait for it to finish" in line
    # The refused process wrote nothing; the first one is stopped by SIGKILL: no cleanup at all.
    assert first.signal(signal.SIGKILL)
    first.wait()
    assert (outputs / LOCK_NAME).exists()
    code, output = run_ncis(stage_args("prepare", outputs), tmp_path)
    assert code == 0, readable(output)
    assert (outputs / "diffusion" / "model_index.json").exists() and debris(outputs) == []


# ---------------------------------------------------------------- full disks, read-only folders (slow: real processes)


@pytest.fixture
def cvpn_outputs(tmp_path):
    """Embeddings and a trained cVPN, as after `ncis train-cvpn`."""
    outputs = tmp_path / "outputs"
    write_embeddings(Layout(outputs).embeddings)
    assert main(stage_args("train-cvpn", outputs)) == 0
    return outputs


@pytest.mark.slow
def test_a_file_size_limit_hit_mid_stage_keeps_the_previous_output(cvpn_outputs, tmp_path):
    """`ulimit -f`: the retrained cVPN (~15 kB) cannot be written; the previous one stays whole."""
    before = digests(cvpn_outputs, skip=RESUME_STATE)
    done = subprocess.run(
        [sys.executable, "-m", "ncis", *stage_args("train-cvpn", cvpn_outputs, "seed=1")],
        cwd=tmp_path, env=child_env(), capture_output=True, text=True, timeout=600,
        preexec_fn=default_signals(limit_file_size(8_000)),  # output to pipes: not subject to the limit
    )
    assert done.returncode == 2, done.stderr[-3000:]
    assert_one_line_error(done.stderr, f"cannot write {Layout(cvpn_outputs).cvpn}: File too large", "ulimit -f")
    assert digests(cvpn_outputs, skip=RESUME_STATE) == before and debris(cvpn_outputs) == []


@pytest.mark.slow
def test_a_full_disk_mid_stage_keeps_the_previous_output(cvpn_outputs, tmp_path):
    """A real ENOSPC: the outputs folder on a tmpfs with a few kB left (needs mount rights)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(mount_point)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        outputs = mount_point / "outputs"
        subprocess.run(["cp", "-a", str(cvpn_outputs), str(outputs)], check=True)
        filler = mount_point / "filler"
        with open(filler, "wb") as handle:  # fill the disk up to ~12 kB
            free = os.statvfs(mount_point).f_bavail * os.statvfs(mount_point).f_frsize
            handle.write(b"\0" * (free - 12_288))
        before = digests(outputs, skip=RESUME_STATE)
        code, output = run_ncis(stage_args("train-cvpn", outputs, "seed=1"), tmp_path)
        assert code == 2, readable(output)
        assert_one_line_error(output, f"cannot write {Layout(outputs).cvpn}: No space left on device", "free disk space")
        assert digests(outputs, skip=RESUME_STATE) == before and debris(outputs) == []
    finally:
        subprocess.run(["umount", str(mount_point)], check=True)


@pytest.mark.slow
def test_unwritable_folders_give_one_line_and_change_nothing(cvpn_outputs, tmp_path):
    prefix = without_root_privileges()
    if prefix is None:
        pytest.skip("running as root without a way to drop CAP_DAC_OVERRIDE")
    layout = Layout(cvpn_outputs)
    before = digests(cvpn_outputs)
    # The outputs folder itself: refused when taking the lock, before any work.
    cvpn_outputs.chmod(0o555)
    try:
        code, output = run_ncis(stage_args("sample", cvpn_outputs), tmp_path, prefix=prefix)
    finally:
        cvpn_outputs.chmod(0o755)
    assert code == 2, readable(output)
    assert_one_line_error(output, f"cannot write {cvpn_outputs}: Permission denied", "writable")
    # One stage's folder: its output cannot be written; the inputs and the earlier stages' stay.
    layout.outliers.parent.mkdir()
    layout.outliers.parent.chmod(0o555)
    try:
        code, output = run_ncis(stage_args("sample", cvpn_outputs), tmp_path, prefix=prefix)
    finally:
        layout.outliers.parent.chmod(0o755)
    assert code == 2, readable(output)
    assert_one_line_error(output, f"cannot write {layout.outliers}: Permission denied")
    assert digests(cvpn_outputs) == before and not layout.outliers.exists() and debris(cvpn_outputs) == []
