"""The one exception users see as a one-line message instead of a traceback."""

from __future__ import annotations


class UserError(Exception):
    """Bad input or environment: the message names the problem and the fix."""


def one_line(err: BaseException) -> str:
    """What the CLI prints for `err`: its message's first line, or, for an error re-raised from
    a DataLoader worker (whose message holds the worker's traceback), the original message."""
    text = str(err).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text.splitlines()[0] if text else type(err).__name__


def unexpected(err: Exception) -> str:
    """The one line for an error ncis did not foresee: a failed write says which file and why."""
    from ncis.io import write_failure

    failure = write_failure(err, getattr(err, "filename", None) or "a file")
    if failure is not None:
        return str(failure)
    return f"unexpected {type(err).__name__}: {one_line(err)}; rerun with --debug for the traceback"
