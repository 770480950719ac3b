"""Safe, atomic storage: safetensors + JSON for weights, .npz without pickle for arrays.

Nothing a user can `dvc pull` is ever unpickled, and a stage that dies half-way
leaves the previous output untouched (write to a temporary name, then rename).

Every loader here checks what it reads: a truncated, corrupt or foreign file (a pickle where
safetensors belong, NaN in an array, weights that do not fit their model) is a `UserError`
naming the file and how to rewrite it, never a traceback from deep inside a library.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import shutil
import struct
import tempfile
import zipfile
import zlib
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from ncis.errors import UserError

# Temporary names of atomic writes. Both start with a dot and carry a mark no user file has,
# so that `sweep_debris` can tell what a killed process left behind.
TMP_MARK = ".ncis-tmp-"
OLD_SUFFIX = ".ncis-old"
SWEEP_DEPTH = 3  # atomic writes happen at most this many folders below the outputs folder

# errno of a failed write -> what the user can do about it
WRITE_FIXES = {
    errno.ENOSPC: "free disk space, or point outputs at another disk (--set outputs=PATH)",
    errno.EDQUOT: "the disk quota is used up; free space, or point outputs elsewhere (--set outputs=PATH)",
    errno.EFBIG: "the file size limit (ulimit -f) is too small for it; raise the limit",
    errno.EACCES: "make the folder writable, or point outputs elsewhere (--set outputs=PATH)",
    errno.EPERM: "make the folder writable, or point outputs elsewhere (--set outputs=PATH)",
    errno.EROFS: "the file system is read-only; point outputs elsewhere (--set outputs=PATH)",
}


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


# ---------------------------------------------------------------- writing


def write_failure(err: BaseException, target: str | Path) -> UserError | None:
    """The one-line error for a write that failed for lack of space or permission; None for other errors.

    safetensors reports I/O errors as its own exception with the OS error number in the text.
    """
    code = getattr(err, "errno", None)
    if isinstance(err, SafetensorError) and "(os error " in str(err):
        with contextlib.suppress(ValueError):
            code = int(str(err).rsplit("(os error ", 1)[1].split(")")[0])
    if code not in WRITE_FIXES:
        return None
    filename = str(getattr(err, "filename", None) or "")
    # The file that failed, unless it is the target or one of atomic_path's temporaries.
    where = f" ({filename})" if filename and filename != str(target) and TMP_MARK not in filename else ""
    return UserError(f"cannot write {target}: {os.strerror(code)}{where}; {WRITE_FIXES[code]}")


@contextlib.contextmanager
def atomic_path(final: str | Path) -> Iterator[Path]:
    """Yield a temporary sibling of `final`; on success it replaces `final` in one rename.

    On any failure the temporary is removed and `final` keeps its previous content; a failure
    for lack of space or permission becomes a one-line `UserError` naming `final`.
    """
    final = Path(final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}{TMP_MARK}", dir=final.parent)) / final.name
    except OSError as err:
        raise write_failure(err, final) or err
    try:
        yield tmp
        if not tmp.exists():
            raise RuntimeError(f"nothing was written to {tmp}")
        if final.is_dir() and not final.is_symlink():
            # A kill between these two renames leaves only `old`: sweep_debris puts it back.
            old = final.with_name(f".{final.name}{OLD_SUFFIX}")
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except (OSError, SafetensorError) as err:
        failure = write_failure(err, final)
        if failure is None:
            raise
        raise failure from None
    finally:
        shutil.rmtree(tmp.parent, ignore_errors=True)


def sweep_debris(root: str | Path) -> list[str]:
    """Clear what killed writers left under `root`: temporary folders of `atomic_path` are removed,
    and a previous output that a kill caught between its two renames is put back. Returns one
    line per thing done.

    Only safe while no other ncis process writes there (the caller holds the outputs lock).
    """
    done = []
    for folder in _folders(Path(root), SWEEP_DEPTH):
        for entry in _entries(folder):
            name = entry.name
            if not name.startswith(".") or not entry.is_dir():
                continue
            if TMP_MARK in name:
                shutil.rmtree(entry, ignore_errors=True)
                done.append(f"removed {entry}")
            elif name.endswith(OLD_SUFFIX):
                original = entry.with_name(name[1 : -len(OLD_SUFFIX)])
                if original.exists():
                    shutil.rmtree(entry, ignore_errors=True)
                    done.append(f"removed {entry}")
                else:
                    entry.rename(original)  # the complete previous output: better than none
                    done.append(f"restored {original} (the previous output)")
    return done


def _folders(root: Path, depth: int) -> Iterator[Path]:
    """`root` and its sub-folders down to `depth` levels (listing a folder of files is cheap)."""
    level = [root] if root.is_dir() else []
    for below in range(depth - 1, -1, -1):
        yield from level
        if below:
            level = [e for f in level for e in _entries(f) if not e.name.startswith(".") and e.is_dir() and not e.is_symlink()]


def _entries(folder: Path) -> list[Path]:
    try:
        return [Path(e.path) for e in os.scandir(folder)]
    except OSError:
        return []


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


def save_arrays(path: str | Path, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp:
        with open(tmp, "wb") as handle:
            np.savez(handle, **arrays)


# ---------------------------------------------------------------- reading, with checks

# Folder names of the outputs layout (ncis/layout.py) -> the stage that writes them.
_WRITERS = {
    "data": "prepare",
    "diffusion": "prepare",
    "diffusion_checkpoints": "prepare",
    "embed": "embed",
    "cvpn": "train-cvpn",
    "cvpn_checkpoints": "train-cvpn",
    "sample": "sample",
    "synthesize": "synthesize",
    "synthesize_batches": "synthesize",
    "classifier": "train-classifier",
    "classifier_checkpoints": "train-classifier",
    "plots": "evaluate",
}


# Folders of resume state: a rerun reuses what is there, so a bad file must go first.
_RESUME_STATE = {"chunks", "diffusion_checkpoints", "cvpn_checkpoints", "synthesize_batches", "classifier_checkpoints"}


def rewrite_hint(path: str | Path) -> str:
    """How to get a good copy of `path`: the stage that writes it, judged by its outputs folder."""
    parts = Path(path).parts[:-1]
    for part in reversed(parts):
        if part in _WRITERS:
            if _RESUME_STATE & set(parts):
                return f"delete it and rerun `ncis {_WRITERS[part]}`, which resumes without it"
            return f"rerun `ncis {_WRITERS[part]}` to rewrite it"
    return "replace it with a good copy"


def _require(path: Path) -> None:
    if not path.is_file():
        raise UserError(f"{path} is missing; {rewrite_hint(path)}")


def _looks_pickled(head: bytes) -> bool:
    # pickle protocol 2+ starts with 0x80; torch.save writes a zip archive holding a pickle.
    return head[:1] == b"\x80" or head[:2] == b"PK"


def check_safetensors(path: str | Path) -> None:
    """Refuse a file that is not whole, well-formed safetensors, reading only its header.

    safetensors' own loader would also refuse it, but with a message that names neither the
    file nor the fix; a pickle placed under a .safetensors name is never unpickled either way.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(8)
        header_size = struct.unpack("<Q", head)[0] if len(head) == 8 else None
        header = handle.read(header_size) if header_size is not None and header_size <= min(size - 8, 100_000_000) else b""
    if _looks_pickled(head):
        raise UserError(
            f"{path} is a pickle (as torch.save writes), not safetensors; ncis never unpickles (loading it could run "
            f"any code), so {rewrite_hint(path)}"
        )
    try:
        entries = json.loads(header)
        end = max([e["data_offsets"][1] for k, e in entries.items() if k != "__metadata__"], default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError):
        raise UserError(f"{path} is not a safetensors file (its header is unreadable); {rewrite_hint(path)}") from None
    if size != 8 + header_size + end:
        raise UserError(f"{path} is truncated ({size} of {8 + header_size + end} bytes); {rewrite_hint(path)}")


def read_safetensors(path: str | Path, device: str = "cpu") -> dict[str, torch.Tensor]:
    path = Path(path)
    _require(path)
    check_safetensors(path)
    try:
        return load_file(str(path), device=device)
    except SafetensorError as err:
        raise UserError(f"{path} is not a readable safetensors file ({err}); {rewrite_hint(path)}") from None


def read_json(path: str | Path) -> dict:
    """A JSON object from `path`; truncated, corrupt or not an object -> UserError."""
    path = Path(path)
    _require(path)
    try:
        data = json.loads(path.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({err}); {rewrite_hint(path)}") from None
    if not isinstance(data, dict):
        raise UserError(f"{path} holds a JSON {type(data).__name__}, not an object; {rewrite_hint(path)}")
    return data


def load_weights(folder: str | Path, required: tuple[str, ...] = ()) -> tuple[dict[str, torch.Tensor], dict]:
    """(`model.safetensors`, `config.json`) of a folder `save_weights` wrote; `required`: config keys it must hold."""
    folder = Path(folder)
    weights, config = folder / "model.safetensors", folder / "config.json"
    if not weights.exists() or not config.exists():
        raise UserError(f"{folder} holds no model (model.safetensors + config.json); run the stage that trains it")
    settings = read_json(config)
    missing = [key for key in required if key not in settings]
    if missing:
        raise UserError(f"{config} lacks {missing}: it was written by another version of ncis; {rewrite_hint(config)}")
    return read_safetensors(weights), settings


def load_state(module: torch.nn.Module, state: dict[str, torch.Tensor], path: str | Path) -> torch.nn.Module:
    """`module.load_state_dict(state)`, with weights made for another configuration as a one-line error."""
    try:
        module.load_state_dict(state)
    except RuntimeError as err:
        detail = next((line.strip() for line in str(err).splitlines()[1:] if line.strip()), str(err))
        if detail.startswith(("Missing key", "Unexpected key")):
            detail = detail.split(", ")[0] + ", ..."  # the first key says enough
        raise UserError(
            f"{path} does not fit the model its config describes ({detail[:200]}); it was made for another "
            f"configuration: {rewrite_hint(path)}"
        ) from None
    return module


def load_arrays(path: str | Path, finite: bool = True) -> dict[str, np.ndarray]:
    """Every array of an .npz file `save_arrays` wrote. Never unpickles; with `finite`, a float array
    holding NaN or Inf is refused (it would spread silently through every later stage)."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} is missing; run the stage that writes it first")
    try:
        data = np.load(path, allow_pickle=False)
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise UserError(f"{path} holds a single .npy array, not the .npz archive ncis writes; {rewrite_hint(path)}")
        with data:
            arrays = {key: data[key] for key in data.files}
    except ValueError as err:
        if "pickle" not in str(err):
            raise UserError(f"{path} is not a readable .npz file ({err}); {rewrite_hint(path)}") from None
        raise UserError(
            f"{path} holds pickled data; ncis never unpickles (loading it could run any code), so {rewrite_hint(path)}"
        ) from None
    except (zipfile.BadZipFile, EOFError, OSError, KeyError, zlib.error) as err:
        raise UserError(f"{path} is truncated or corrupt ({err}); {rewrite_hint(path)}") from None
    if finite:
        for key, array in arrays.items():
            if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
                bad = np.argwhere(~np.isfinite(array))
                raise UserError(
                    f"{path}: array {key!r} holds {len(bad)} NaN/Inf values (first at index {tuple(int(i) for i in bad[0])}); "
                    f"{rewrite_hint(path)} (if that stage diverged, lower its learning rate)"
                )
    return arrays


def read_image(path: str | Path, mode: str | None = "RGB"):
    """Decode an image file now (PIL decodes lazily) and convert it to `mode` (None: keep its own).

    With the default "RGB" it is torchvision's `default_loader`, plus a one-line error naming a
    truncated or unreadable file instead of a traceback from the middle of a training loop.
    """
    from PIL import Image

    try:
        with open(path, "rb") as handle:
            image = Image.open(handle)
            image.load()
            return image.convert(mode) if mode else image.copy()
    except (OSError, SyntaxError, ValueError, zlib.error) as err:
        raise UserError(
            f"{path} is not a readable image ({err}); replace or delete it ({rewrite_hint(path)})"
        ) from None


# ---------------------------------------------------------------- model files from elsewhere

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")
OPT_IN = "only if you trust this file, set diffusion.allow_pickle=true"


def refuse_pickled_folder(source: str | Path, allow_pickle: bool = False) -> None:
    """A local diffusers folder whose component holds only pickled weights (e.g. `unet/*.bin`) is
    refused by name; diffusers (asked for safetensors only) would say just that none were found."""
    folder = Path(source)
    if allow_pickle or not folder.is_dir():
        return
    for component in sorted(p for p in folder.iterdir() if p.is_dir()):
        pickled = sorted(p for p in component.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickled and not any(component.glob("*.safetensors")):
            raise UserError(
                f"diffusion.model: {pickled[0]} holds pickled weights, and loading them runs any code they hold; "
                f"save the model with safetensors (save_pretrained(..., safe_serialization=True)), or, {OPT_IN}"
            )


@contextlib.contextmanager
def trusted_single_file(source: str | Path, allow_pickle: bool = False) -> Iterator[str]:
    """The path to hand diffusers' `from_single_file` for `source`, refusing pickles unless allowed.

    A `.ckpt` is a pickle: unpickling runs whatever code it holds. diffusers loads it with
    `torch.load(weights_only=True)`, whose restricted unpickler has had escapes (CVE-2025-32434)
    and which cannot read most original Stable Diffusion checkpoints (they pickle Lightning
    objects) anyway. So a pickle is refused before anything reads it, unless the user vouches
    for the file (`diffusion.allow_pickle: true`): then it is unpickled in full here, once, and
    its tensors are handed on as a temporary safetensors file.
    """
    source = Path(source)
    if not source.is_file():
        raise UserError(f"diffusion.model: no such file {source}; point it at a .safetensors (or .ckpt) checkpoint")
    if source.suffix == ".safetensors":
        check_safetensors(source)
        yield str(source)
        return
    if not allow_pickle:
        raise UserError(
            f"diffusion.model: {source} is a pickle checkpoint, and loading one runs any code it holds; use a "
            f".safetensors file or diffusers folder of the model, or, {OPT_IN}"
        )
    print(f"ncis: note: unpickling {source} in full (diffusion.allow_pickle=true): trusted files only")
    checkpoint = torch.load(source, map_location="cpu", weights_only=False)
    while isinstance(checkpoint, dict) and isinstance(checkpoint.get("state_dict"), dict):
        checkpoint = checkpoint["state_dict"]
    if not isinstance(checkpoint, dict):
        raise UserError(f"diffusion.model: {source} holds a {type(checkpoint).__name__}, not a state dict of tensors")
    tensors, storages = {}, set()
    for key, value in checkpoint.items():
        if isinstance(value, torch.Tensor):
            # safetensors stores no shared memory: a tensor viewing one already kept gets a copy.
            shared = value.untyped_storage().data_ptr() in storages
            storages.add(value.untyped_storage().data_ptr())
            tensors[key] = value.clone().contiguous() if shared else value.contiguous()
    with tempfile.TemporaryDirectory(prefix="ncis-unpickled-") as folder:
        converted = Path(folder) / f"{source.stem}.safetensors"
        save_file(tensors, str(converted))
        yield str(converted)
