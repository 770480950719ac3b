"""Training checkpoints that resume bit-identically and load without unpickling.

One checkpoint is a folder `<unit>_<NNNN>/` (e.g. `epoch_0007`) written atomically, holding
`state.safetensors` (every tensor: the modules' weights, the optimiser's moments, random
generators' states, the caller's own tensors) and `state.json` (the rest: the optimiser's
hyper-parameters and step counts, the learning-rate schedule, the caller's metadata). torch.save
would pickle all of it, and ncis never unpickles. A folder of checkpoints is claimed by its
work key (ncis/resume.py) before use, so only the same work resumes from it.
train-classifier (per epoch), train-cvpn (per epoch) and prepare's tiny model (every few
hundred steps) checkpoint through here.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from ncis.io import atomic_path, read_json, read_safetensors

TENSORS, META = "state.safetensors", "state.json"


def saved(folder: Path, unit: str) -> list[tuple[int, Path]]:
    """Complete checkpoints in `folder` (an atomic write exists only once whole), oldest first."""
    found = []
    for path in Path(folder).glob(f"{unit}_*") if Path(folder).is_dir() else []:
        if (path / TENSORS).exists() and (path / META).exists():
            found.append((int(path.name.rsplit("_", 1)[1]), path))
    return sorted(found)


def save(
    folder: Path,
    unit: str,
    count: int,
    *,
    modules: Mapping[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler,
    generators: Mapping[str, torch.Generator] = {},
    tensors: Mapping[str, torch.Tensor] = {},
    meta: dict,
    keep: int = 1,
) -> Path:
    """Write the checkpoint after `count` units (epochs, steps), then delete all but the `keep` newest."""
    state = {f"{name}/{k}": v for name, module in modules.items() for k, v in module.state_dict().items()}
    state.update({f"generator/{name}": g.get_state() for name, g in generators.items()})
    state.update({f"tensor/{name}": v for name, v in tensors.items()})
    optim = optimizer.state_dict()
    optim_scalars: dict[str, dict] = {}
    for index, values in optim["state"].items():
        for key, value in values.items():
            if torch.is_tensor(value):
                state[f"optimizer/{index}/{key}"] = value
            else:
                optim_scalars.setdefault(str(index), {})[key] = value
    meta = dict(meta, **{unit: count}, optimizer={"param_groups": optim["param_groups"], "state": optim_scalars}, scheduler=scheduler.state_dict())
    with atomic_path(Path(folder) / f"{unit}_{count:04d}") as tmp:
        tmp.mkdir()
        save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp / TENSORS))
        (tmp / META).write_text(json.dumps(meta, indent=2) + "\n")
    for _, old in saved(folder, unit)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return Path(folder) / f"{unit}_{count:04d}"


def load(
    path: Path,
    *,
    modules: Mapping[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    scheduler,
    generators: Mapping[str, torch.Generator] = {},
    device: torch.device | str = "cpu",
) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore what `save` wrote into the given objects; returns (metadata, the caller's own tensors).

    A damaged file is a one-line error naming it (ncis.io's readers)."""
    state = read_safetensors(Path(path) / TENSORS, device=str(device))
    meta = read_json(Path(path) / META)
    for name, module in modules.items():
        module.load_state_dict({k.split("/", 1)[1]: v for k, v in state.items() if k.startswith(f"{name}/")})
    for name, generator in generators.items():
        generator.set_state(state[f"generator/{name}"].cpu())
    moments: dict[int, dict] = {}
    for key, value in state.items():
        if key.startswith("optimizer/"):
            _, index, name = key.split("/", 2)
            moments.setdefault(int(index), {})[name] = value
    for index, values in meta["optimizer"]["state"].items():
        moments.setdefault(int(index), {}).update(values)
    optimizer.load_state_dict({"state": moments, "param_groups": meta["optimizer"]["param_groups"]})
    scheduler.load_state_dict(meta["scheduler"])
    return meta, {k.split("/", 1)[1]: v for k, v in state.items() if k.startswith("tensor/")}
