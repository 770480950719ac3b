"""Stopping a run cleanly: Ctrl-C, a scheduler's SIGTERM and a closed terminal all act alike.

Python turns SIGINT into KeyboardInterrupt, which unwinds the stack: every `atomic_path`
removes its temporary, MLflow marks the run KILLED, and the CLI prints one line saying how
to resume. SIGTERM (what Slurm, Kubernetes, `timeout` and `kill` send) and SIGHUP would
instead end the process on the spot; here they raise the same exception, so a job stopped
by its scheduler leaves the same clean state as one stopped by hand.
"""

from __future__ import annotations

import contextlib
import signal
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


class Stopped(KeyboardInterrupt):
    """Raised in the main thread by SIGTERM or SIGHUP."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def stop_signals_interrupt() -> Callable[[], None]:
    """From now on SIGTERM and SIGHUP raise `Stopped` as SIGINT raises KeyboardInterrupt; returns
    the function that puts the previous handlers back.

    A signal that is ignored (SIG_IGN, e.g. SIGHUP under `nohup`) stays ignored.
    """

    def stop(signum, frame):
        _received.append(signum)
        raise Stopped(signum)

    previous = {}
    for signum in STOP_SIGNALS:
        if signal.getsignal(signum) == signal.SIG_DFL:
            with contextlib.suppress(ValueError):  # not the main thread: signals are not ours to handle
                previous[signum] = signal.signal(signum, stop)

    def restore() -> None:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received.clear()

    return restore


_received: list[int] = []  # stop signals received since the handlers were installed


@contextlib.contextmanager
def in_stage(name: str) -> Iterator[None]:
    """Mark an exception leaving the block with the stage it stopped (for the message)."""
    try:
        yield
    except BaseException as err:
        if getattr(err, "ncis_stage", None) is None:
            with contextlib.suppress(AttributeError):
                err.ncis_stage = name
        raise


def stop_signal(err: BaseException) -> int | None:
    """The signal that stopped the run, if one did: the one `err` was raised for, or else a stop
    signal received before `err` (a DataLoader worker killed by the same SIGTERM can make the main
    process fail with "DataLoader worker ... is killed by signal" before the handler raises)."""
    if isinstance(err, KeyboardInterrupt):
        return getattr(err, "signum", signal.SIGINT)
    return _received[0] if _received else None


def exit_code(err: BaseException) -> int:
    """The shell's convention for a process ended by a signal: 128 + its number (Ctrl-C: 130)."""
    return 128 + (stop_signal(err) or signal.SIGINT)


def interrupted_message(err: BaseException, pipeline: bool = False) -> str:
    """One line for a stopped run. For `ncis run` stopped in a later stage, the rerun that resumes
    it starts there: a plain rerun would run `prepare` again, whose rewritten inputs (new file
    times) void the stopped stage's saved work."""
    name = signal.Signals(stop_signal(err) or signal.SIGINT).name
    stage = getattr(err, "ncis_stage", None)
    where = f" during stage {stage}" if stage else ""
    rerun = "rerun the same command to resume"
    if pipeline and stage and stage != "prepare":
        rerun = f"rerun it with --from {stage} to resume that stage and go on (the same command alone starts again at prepare)"
    return f"ncis: stopped by {name}{where}; finished outputs are kept and nothing half-written is left: {rerun}"
