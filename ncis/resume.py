"""Resumable work keyed by its inputs: partial results are reused only by the same work.

A work key is a digest of the settings that shape a result and of a signature of each input
folder (its files' names, sizes and modification times: `io.files_signature`); data a stage
rewrites before the work starts (same content, new file times) is signed by content instead
(`content_digest`). A folder of
partial work carries its key in a stamp file; `claim` reuses it only under the same key. embed's
chunks, train-classifier's checkpoints and the benchmark scripts' finished runs all go through here.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ncis.errors import UserError
from ncis.io import files_signature, write_failure

STAMP = "work-key.txt"


def work_key(settings: Mapping[str, Any], inputs: Mapping[str, Path] | None = None) -> str:
    """Digest of `settings` (JSON-able) and of the files below each input folder."""
    payload = {
        "settings": settings,
        "inputs": {name: files_signature(Path(folder)) for name, folder in sorted((inputs or {}).items())},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def content_digest(*arrays: np.ndarray) -> str:
    """Digest of the arrays' bytes, in order: a work key's data signed by content."""
    digest = hashlib.sha256()
    for array in arrays:
        digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def claim(folder: Path, key: str, *, discard_other: bool = True) -> bool:
    """Make `folder` the home of the work `key`; True if it already holds that work (resume it).

    A folder holding other work (another key, or no stamp) is emptied when `discard_other`
    (cheap, re-computable partial work), else refused with a one-line error (finished results
    a person should decide about).
    """
    folder = Path(folder)
    stamp = folder / STAMP
    if stamp.is_file() and stamp.read_text().strip() == key:
        return True
    if folder.exists() and any(folder.iterdir()):
        if not discard_other:
            raise UserError(f"{folder} holds work made with other settings or inputs; delete it or choose another folder")
        shutil.rmtree(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        stamp.write_text(key + "\n")
    except OSError as err:
        raise write_failure(err, stamp) or err from None
    return False
