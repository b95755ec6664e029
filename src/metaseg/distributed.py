"""Several processes for the train stage (GPUs of one machine, or several machines): torch.distributed, torchrun.

The contract (docs/design.md, "Several processes"): every process holds the same weights and runs the same loop;
each takes a disjoint ``share`` of the meta-batch's tasks; ``Algorithm._outer_update`` turns each process's
meta-gradient into the mean over the whole meta-batch with ``average_grads`` (the single-process mean, uneven
shares included) before clipping and the optimiser step, so every process takes the same step; rank 0 alone
writes files. No ``DistributedDataParallel``: it does not work with ``torch.autograd.grad`` (its documentation),
which the functional inner loop is made of; one explicit all-reduce of the meta-gradient is all it takes.

Every function here is a no-op (or returns its input) in a single process, so a run without torchrun is
exactly the single-process code path. A collective that fails (another process died, or none answered within
the timeout) raises ``ProcessGroupError`` with one line.
"""
from __future__ import annotations

import functools
import os
import re
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

from metaseg.config import ConfigError

T = TypeVar("T")


class ProcessGroupError(RuntimeError):
    """A collective failed: another process stopped, or none answered within the timeout."""


def launched() -> bool:
    """Started by torchrun (or a launcher that sets torch.distributed's ``env://`` variables)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def torchrun_argv(module: str, args: Sequence[str], *, nproc: int) -> list[str]:
    """The command that runs ``python -m module args`` in ``nproc`` processes on this machine (torchrun with its
    own rendezvous on a free local port)."""
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nnodes=1", f"--nproc-per-node={nproc}",
            "-m", module, *args]


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


@contextmanager
def process_group(device: str, *, processes: int, timeout_s: float) -> Iterator[None]:
    """Join torchrun's process group (nccl on CUDA, each process on GPU ``LOCAL_RANK``; gloo on CPU) when launched
    by torchrun, else do nothing. ``processes``: the count the params ask for (train.nproc x train.nnodes); a
    launch of another size is a ``ConfigError``. Waits for every process at the end (rank 0 writes the outputs
    last), then leaves the group."""
    if not launched():
        yield
        return
    launched_size = int(os.environ["WORLD_SIZE"])
    if launched_size != processes:
        raise ConfigError(f"'train.nproc' x 'train.nnodes' = {processes} processes, but torchrun started "
                          f"{launched_size}; set them to what you launch (params.yaml records the run)")
    if device == "cuda":
        local, gpus = int(os.environ.get("LOCAL_RANK", "0")), torch.cuda.device_count()
        if local >= gpus:  # NCCL runs one process per GPU
            raise ConfigError(f"'train.nproc': process {local} of this machine has no GPU of its own ({gpus} "
                              f"visible); set train.nproc to at most {gpus}")
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if device == "cuda" else "gloo", timeout=timedelta(seconds=timeout_s))
    try:
        yield
        barrier()
    finally:
        dist.destroy_process_group()


def _backend_reason(err: BaseException) -> str:
    """The backend's reason on one line, without its source location and boilerplate advice (gloo: "[.../pair.cc:545]
    Read error [127.0.0.1]:34742: Connection reset by peer. This is typically caused by ...")."""
    text = " ".join(str(err).split()) or type(err).__name__
    text = re.sub(r"^\[[^\]]*\.(cc|cpp|h)(:\d+)?\]\s*", "", text)
    return text.split(". This is typically")[0]


def _collective(what: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
    def wrap(fn: Callable[..., T]) -> Callable[..., T]:
        @functools.wraps(fn)
        def run(*args: Any, **kw: Any) -> T:
            try:
                return fn(*args, **kw)
            except ProcessGroupError:
                raise
            except RuntimeError as err:
                raise ProcessGroupError(f"rank {rank()}: {what} failed: another process stopped or did not answer "
                                        f"within the timeout (train.timeout_s): {_backend_reason(err)}") from None
        return run
    return wrap


def share(items: Sequence[T], rank: int, world_size: int) -> list[T]:
    """Process ``rank``'s disjoint share of ``items``: items rank, rank + world_size, ... The shares' union is
    ``items``; with ``len(items) % world_size != 0`` the first shares hold one more."""
    return list(items[rank::world_size])


def _groups(tensors: Iterable[Tensor]) -> dict[tuple[torch.dtype, torch.device], list[Tensor]]:
    out: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for t in tensors:
        out.setdefault((t.dtype, t.device), []).append(t)
    return out


def _weighted_mean_(tensors: list[Tensor], weight: float, total: float) -> None:
    """In place: each tensor becomes sum over processes of (weight x tensor) / total; one all-reduce per dtype."""
    for group in _groups(tensors).values():
        flat = torch.cat([t.reshape(-1) for t in group]) * weight
        dist.all_reduce(flat)
        flat /= total
        offset = 0
        for t in group:
            t.copy_(flat[offset:offset + t.numel()].view_as(t))
            offset += t.numel()


@_collective("averaging the meta-gradient")
def average_grads(params: Iterable[Tensor], weight: int) -> None:
    """Make every process's ``.grad`` the mean over all processes' tasks.

    On entry ``p.grad`` is this process's mean over its ``weight`` tasks (None: no gradient here); on return it
    is sum_r weight_r * grad_r / sum_r weight_r on every process, i.e. the single-process mean over the whole
    meta-batch even for uneven shares. A parameter without a gradient on every process keeps None (the
    optimiser skips it, as in one process)."""
    if not active():
        return
    params = list(params)
    device = params[0].device
    head = torch.tensor([float(weight)] + [float(p.grad is not None) for p in params], dtype=torch.float64,
                        device=device)
    dist.all_reduce(head)
    total, has = float(head[0]), head[1:].tolist()
    grads = []
    for p, flag in zip(params, has):
        if not flag:
            p.grad = None
            continue
        if p.grad is None:
            p.grad = torch.zeros_like(p)
        grads.append(p.grad)
    _weighted_mean_(grads, float(weight), total)


@_collective("averaging BatchNorm running statistics")
def average_buffers(buffers: Iterable[Tensor], weight: int) -> None:
    """Float buffers (BatchNorm running statistics) become their ``weight``-weighted mean over processes: each
    process's train-mode BN normalised its own share of the batch (as under ``DistributedDataParallel`` without
    SyncBatchNorm); the averaged running mean equals the single-process one, the running variance leaves out the
    spread between the shares' means."""
    if not active():
        return
    floats = [b for b in buffers if b.is_floating_point()]
    if floats:
        _weighted_mean_(floats, float(weight), world_sum([float(weight)])[0])


@_collective("summing the step's metrics")
def world_sum(values: Sequence[float]) -> list[float]:
    """``values`` summed element-wise over processes (float64); ``values`` itself in a single process."""
    if not active():
        return list(values)
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    t = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


@_collective("sending rank 0's state")
def broadcast_object(obj: T) -> T:
    """Rank 0's ``obj`` on every process (e.g. the checkpoint rank 0 read: other nodes need no copy of it)."""
    if not active():
        return obj
    box = [obj if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0)
    return box[0]


@_collective("sending rank 0's weights")
def broadcast_tensors(tensors: Iterable[Tensor]) -> None:
    """Copy rank 0's values into ``tensors`` on every process (identical starting weights, as DDP does)."""
    if not active():
        return
    for t in tensors:
        dist.broadcast(t.detach(), src=0)


@_collective("gathering every process's state")
def gather_objects(obj: T) -> list[T]:
    """``[obj of rank 0, obj of rank 1, ...]`` on every process; ``[obj]`` in a single process."""
    if not active():
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


@_collective("waiting for the other processes")
def barrier() -> None:
    if active():
        dist.barrier()
