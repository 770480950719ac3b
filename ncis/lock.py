"""One ncis process per outputs folder: an advisory lock, `<outputs>/.ncis.lock`.

Two processes writing the same outputs (a second `ncis run`, a `dvc repro` beside an
`ncis train-cvpn`) would interleave their files into a result neither computed. The lock is
an `flock` on the file, which the kernel drops when its holder dies however it dies, so a
killed run never blocks the next one; the file's content (pid, host, command, start time)
only serves the message that names the holder.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path
from typing import Iterator

from ncis.errors import UserError

LOCK_NAME = ".ncis.lock"


def describe_holder(path: Path) -> str:
    try:
        holder = json.loads(path.read_text())
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(holder["started"]))
        return f"`{holder['command']}` (pid {holder['pid']} on {holder['host']}, since {since})"
    except (OSError, ValueError, KeyError, TypeError):
        return "another ncis process"  # caught between its lock and its first write


@contextlib.contextmanager
def outputs_lock(outputs: str | Path, command: str | None = None) -> Iterator[Path]:
    """Hold the lock of `outputs` (created if missing) for the block; refuse if another process holds it."""
    outputs = Path(outputs)
    path = outputs / LOCK_NAME
    try:
        outputs.mkdir(parents=True, exist_ok=True)
        handle = _acquire(path)
    except OSError as err:
        from ncis.io import write_failure

        raise write_failure(err, outputs) or err
    if handle is None:
        raise UserError(
            f"outputs folder {outputs} is in use by {describe_holder(path)}; wait for it to finish, "
            "or give this run another folder (--set outputs=PATH)"
        )
    try:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "command": command or " ".join(sys.argv), "started": time.time()}
        os.ftruncate(handle, 0)
        os.write(handle, (json.dumps(info) + "\n").encode())
        yield path
    finally:
        # Unlinked while still held: a process waiting on this file sees it replaced (see _acquire).
        with contextlib.suppress(OSError):
            path.unlink()
        os.close(handle)


def _acquire(path: Path) -> int | None:
    """A descriptor of `path` holding its exclusive flock, or None if another process holds it."""
    while True:
        handle = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by child processes
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(handle)
            return None
        except BaseException:
            os.close(handle)
            raise
        # The holder we waited for may have unlinked the file meanwhile: then our lock is on a
        # file nobody else will see, and a third process could lock a new one. Start over.
        try:
            same = os.path.samestat(os.fstat(handle), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            return handle
        os.close(handle)


@contextlib.contextmanager
def exclusive_outputs(outputs: str | Path, command: str | None = None) -> Iterator[None]:
    """The lock, then a sweep of what killed runs left behind (see ncis.io.sweep_debris)."""
    from ncis.io import sweep_debris

    with outputs_lock(outputs, command):
        for action in sweep_debris(outputs):
            print(f"ncis: {action}, left by an interrupted run", file=sys.stderr)
        yield
