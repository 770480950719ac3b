"""Safe, atomic storage: safetensors + JSON for weights, .npz without pickle for arrays.

Nothing a user can `dvc pull` is ever unpickled, and a stage that dies half-way
leaves the previous output untouched (write to a temporary name, then rename).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ncis.errors import UserError


def files_signature(folder: Path) -> str:
    """Hash of every file's name, size and modification time below `folder` (of nothing if it is
    not a folder): regenerated inputs change it.

    Cheap enough for ImageNet-size folders (no file is read); a false change (e.g. a
    `dvc checkout` touching files) only costs a fresh start, never a stale resume.
    """
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")) if folder.is_dir() else []:
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent)) / final.name
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to {tmp}")
        if final.is_dir() and not final.is_symlink():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def write_json(path: str | Path, data) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def save_weights(folder: str | Path, module: torch.nn.Module, config: dict) -> None:
    """`folder/model.safetensors` + `folder/config.json`, written atomically as one folder."""
    with atomic_path(folder) as tmp:
        tmp.mkdir()
        state = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")


def load_weights(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    folder = Path(folder)
    weights, config = folder / "model.safetensors", folder / "config.json"
    if not weights.exists() or not config.exists():
        raise UserError(f"{folder} holds no model (model.safetensors + config.json); run the stage that trains it")
    return load_file(str(weights)), json.loads(config.read_text())


def save_arrays(path: str | Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)


def load_arrays(path: str | Path) -> dict[str, np.ndarray]:
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} is missing; run the stage that writes it first")
    with np.load(path, allow_pickle=False) as data:
        return {key: data[key] for key in data.files}
