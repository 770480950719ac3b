"""Seeding and device choice, shared by every stage."""

from __future__ import annotations

import contextlib
import random

import numpy as np
import torch


def seed_everything(seed: int) -> torch.Generator:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        from ncis.errors import UserError

        raise UserError("device=cuda but no CUDA GPU is visible; use --set device=cpu or device=auto")
    return torch.device(name)


@contextlib.contextmanager
def single_cpu_thread(device: torch.device, when: bool = True):
    """Run small models on one intra-op thread: a step of hundreds of tiny ops loses more to thread
    synchronisation than it gains (measured many times slower with 2 threads on a busy 2-core machine)."""
    if device.type != "cpu" or not when:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def item_generator(seed: int, index: int) -> torch.Generator:
    """The random stream of item `index` (an image, an outlier embedding) under `seed`: what an item
    draws does not depend on which items share its batch, its shard or its run."""
    return torch.Generator().manual_seed(seed * 1_000_003 + index)


def compiled(module: torch.nn.Module, enabled: bool) -> torch.nn.Module:
    """`module` through torch.compile when `enabled` (the `compile` parameter), else itself."""
    return torch.compile(module) if enabled else module


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of a `precision` setting (auto = bfloat16 on CUDA), None for float32."""
    if precision == "bfloat16" or (precision == "auto" and device.type == "cuda"):
        return torch.bfloat16
    return None
