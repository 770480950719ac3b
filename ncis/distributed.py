"""Several processes on one stage, started by `torchrun`: rank, world size, barrier, gather.

`torchrun --nproc_per_node=N -m ncis.cli <stage> ...` sets RANK, WORLD_SIZE and LOCAL_RANK;
`session()` then joins the process group (nccl on GPUs, gloo on CPUs) and gives each process
its own GPU. Without those variables everything here is a no-op of one process, rank 0 of 1.

Stages split their work by rank and rank 0 merges it: every item keeps its own random stream
(`ncis.runtime.item_generator`) and its batch, so the merged result is the one a single process
computes with the same seed. Only rank 0 writes final outputs, holds the outputs lock and logs
to MLflow.
"""

from __future__ import annotations

import contextlib
import datetime
import os
from typing import TYPE_CHECKING, Any, Callable, ContextManager, Iterator, Sequence, TypeVar

from ncis.errors import UserError

if TYPE_CHECKING:
    import torch

T = TypeVar("T")


def _dist():
    # torch is imported where a process group can exist: `ncis compare`, `publish` and a refused
    # parameter never pay its second of start-up.
    import torch.distributed

    return torch.distributed


def launched() -> bool:
    """Started by torchrun (or an equivalent launcher) with more than one process."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def active() -> bool:
    return launched() and _dist().is_available() and _dist().is_initialized()


def rank() -> int:
    return _dist().get_rank() if active() else 0


def world_size() -> int:
    return _dist().get_world_size() if active() else 1


def is_main() -> bool:
    return rank() == 0


def barrier() -> None:
    if active():
        _dist().barrier()


@contextlib.contextmanager
def session(device_name: str, timeout_minutes: float) -> Iterator[None]:
    """Join the process group for the block when launched by torchrun; nothing otherwise."""
    if not launched() or active():
        yield
        return
    import torch

    dist = _dist()
    use_cuda = device_name in ("auto", "cuda") and torch.cuda.is_available()
    if use_cuda:
        # Every later torch.device("cuda") means this process's own GPU.
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=timeout_minutes))
    try:
        yield
    except RuntimeError as err:  # gloo and nccl report a wait past the timeout as a bare RuntimeError
        if "timed out" not in str(err).lower():
            raise
        raise UserError(
            f"rank {rank()} waited more than {timeout_minutes:g} min for the other ranks (process_group_timeout_minutes), "
            f"e.g. for rank 0 through a stage it runs alone; raise it: --set process_group_timeout_minutes={4 * timeout_minutes:g}"
        ) from None
    finally:
        dist.destroy_process_group()


def shard(items: Sequence[T]) -> list[T]:
    """This rank's share of `items`: every world_size-th one, from position `rank`."""
    return list(items[rank() :: world_size()])


def broadcast(value: Any) -> Any:
    """Rank 0's `value` on every rank (a picklable object sent between our own processes)."""
    if not active():
        return value
    box = [value]
    _dist().broadcast_object_list(box, src=0)
    return box[0]


def gather(value: Any) -> list[Any] | None:
    """Every rank's `value`, by rank, on rank 0; None on the others."""
    if not active():
        return [value]
    values = [None] * world_size() if is_main() else None
    _dist().gather_object(value, values, dst=0)
    return values


@contextlib.contextmanager
def held_by_main(enter: Callable[[], ContextManager]) -> Iterator[None]:
    """Rank 0 enters `enter()` (e.g. the outputs lock) and keeps it until every rank has finished;
    the others start only once it holds it, and all fail with its one-line error if it could not."""
    if not active():
        with enter():
            yield
        return
    with contextlib.ExitStack() as stack:
        refusal = None
        if is_main():
            try:
                stack.enter_context(enter())
            except UserError as err:
                refusal = str(err)
        refusal = broadcast(refusal)
        if refusal is not None:
            raise UserError(refusal)
        yield
        barrier()


def sampler(dataset) -> torch.utils.data.DistributedSampler | None:
    """A shuffling sampler giving this rank its share of `dataset` (None in one process). Its
    order is set per epoch with `set_epoch`; the last incomplete share is dropped, as one
    process's loader drops its last incomplete batch."""
    if not active():
        return None
    from torch.utils.data import DistributedSampler

    return DistributedSampler(dataset, shuffle=True, seed=0, drop_last=True)


def parallel(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """`model` wrapped in DistributedDataParallel (gradients averaged across ranks); itself in one process."""
    if not active():
        return model
    import torch
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)


def average_gradients(parameters) -> None:
    """Average the gradients of parameters outside a DistributedDataParallel module across ranks."""
    if not active():
        return
    for parameter in parameters:
        if parameter.grad is not None:
            _dist().all_reduce(parameter.grad)
            parameter.grad /= world_size()
