"""The process group a run lives in: rank, device, and the collective operations the trainer needs.

One process needs nothing. Under ``torchrun`` or the ``deepspeed`` launcher (``RANK``, ``WORLD_SIZE``, …
set) the group is initialised with NCCL on GPUs and gloo on CPUs.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@functools.lru_cache(maxsize=1)
def _libc():
    """The C library's symbols (the process's own, which include libc's on Linux), or None."""
    try:
        libc = ctypes.CDLL(None)
    except OSError:
        name = ctypes.util.find_library("c")
        try:
            libc = ctypes.CDLL(name) if name else None
        except OSError:
            return None
    for fn, args in (("malloc_trim", [ctypes.c_size_t]), ("mallopt", [ctypes.c_int, ctypes.c_int])):
        if hasattr(libc, fn):  # glibc only
            getattr(libc, fn).argtypes = args
            getattr(libc, fn).restype = ctypes.c_int
    return libc


def _malloc_trim():
    return getattr(_libc(), "malloc_trim", None)


M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number


def map_large_blocks(threshold: int = 128 * 1024) -> bool:
    """Serve every allocation of ``threshold`` bytes or more from its own mapping, handed back to the operating system
    when freed (glibc's ``M_MMAP_THRESHOLD``, fixed; elsewhere nothing is done and False is returned).

    By default glibc raises that threshold to the largest block freed so far (up to 32 MiB) and keeps the pages of
    blocks below it for reuse. ZeRO-3 gathers and releases whole parameters at every pass, so a rank's resident memory
    then grows by hundreds of MiB of freed pages during an update; with a fixed threshold it stays at what the rank
    holds. Process-wide and kept for the process's life. Costs a page fault per page of each large allocation, which
    only a CPU run notices."""
    libc = _libc()
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    return bool(mallopt(M_MMAP_THRESHOLD, threshold))


def release_free_memory() -> bool:
    """Hand the C allocator's free pages back to the operating system (glibc's ``malloc_trim``; elsewhere nothing is
    done and False is returned).

    Loading a model under ZeRO-3 builds each parameter whole before keeping this rank's partition of it; glibc keeps
    the freed pages of such blocks for later requests, so without this a rank's resident memory grows by about as
    much again as the partitions it keeps, model after model. Called under ZeRO-3 after each partitioned load, engine
    set-up, rollout and optimizer step and whole-weight export: a walk over the allocator's free lists, milliseconds
    next to any of them."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True


class DistComm:
    """``Comm`` over ``torch.distributed``."""

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        sizes = [torch.zeros(1, dtype=torch.long, device=x.device) for _ in range(self.world_size)]
        dist.all_gather(sizes, torch.tensor([x.shape[0]], device=x.device))
        width = int(max(s.item() for s in sizes))
        padded = torch.zeros((width, *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[: x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(parts, padded)
        return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)], dim=0)

    def all_reduce_mean(self, x: torch.Tensor) -> torch.Tensor:
        return self.all_reduce_sum(x) / self.world_size

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        """Sum of ``x`` over ranks (a new tensor on ``x``'s device; NCCL reduces a copy on the GPU)."""
        y = x.clone() if x.is_cuda or dist.get_backend() != "nccl" else x.cuda()
        dist.all_reduce(y, op=dist.ReduceOp.SUM)
        return y.to(x.device)

    def all_max(self, n: int) -> int:
        value = torch.tensor([n], dtype=torch.long)
        if dist.get_backend() == "nccl":
            value = value.cuda()
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return int(value.item())

    def all_finished(self, local_done: bool) -> bool:
        return self.all_max(0 if local_done else 1) == 0


class LocalRuntimeComm:
    world_size = 1

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_reduce_mean(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_reduce_sum(self, x: torch.Tensor) -> torch.Tensor:
        return x

    def all_max(self, n: int) -> int:
        return n

    def all_finished(self, local_done: bool) -> bool:
        return local_done


@dataclass
class Runtime:
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    comm: DistComm | LocalRuntimeComm

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def init_runtime(use_deepspeed: bool) -> Runtime:
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if not use_deepspeed and not cuda:
        # a run without DeepSpeed still imports it through transformers (saving a model asks whether it is a DeepSpeed
        # engine), and DeepSpeed then warns that it fell back to the CPU: it is told so beforehand
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if use_deepspeed and not dist.is_initialized():
        import deepspeed

        if world_size == 1:  # DeepSpeed needs a process group even for one process: a group of one
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                               ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(_free_port()))):
                os.environ.setdefault(key, value)
        deepspeed.init_distributed(dist_backend="nccl" if cuda else "gloo")
    elif world_size > 1 and not dist.is_initialized():
        dist.init_process_group(backend="nccl" if cuda else "gloo")
    comm = DistComm(world_size) if world_size > 1 else LocalRuntimeComm()
    return Runtime(rank, local_rank, world_size, device, comm)
