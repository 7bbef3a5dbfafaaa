"""Where a collective's tensor must live: NCCL reduces device tensors only, gloo CPU ones.

DeepSpeed initialises torch.distributed with its accelerator's backend: NCCL on CUDA, gloo on
the CPU; goat_dist asks for both on CUDA (``dist_backend``). Small bookkeeping tensors (token counts, eval sums, expert-load counts) are naturally
built on the host; under NCCL an all-reduce of a CPU tensor fails ("No backend type associated
with device type cpu"). ``all_reduce_`` copies such a tensor to the backend's device and back, so
the same code runs under gloo and NCCL. Hot-path tensors should be created on the device in the
first place (no copy at all); this helper is for the host-side ones.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.distributed as dist


def dist_backend() -> Optional[str]:
    """The torch.distributed backend to initialise with: ``"cpu:gloo,cuda:nccl"`` on CUDA, so
    CUDA tensors go over NCCL and the CPU tensors some steps keep on purpose (ZeRO-3 shards
    offloaded to host memory, gathered for the SVD init; its priors' broadcast) over gloo;
    None elsewhere (DeepSpeed's accelerator default: gloo on the CPU)."""
    if torch.cuda.is_available() and dist.is_nccl_available():
        return "cpu:gloo,cuda:nccl"
    return None


def comm_device(group: Optional[dist.ProcessGroup] = None) -> torch.device:
    """Where ``group``'s backend reduces a host tensor: this rank's CUDA device under NCCL alone,
    the CPU otherwise (gloo, mpi, or gloo+NCCL, which reduces CPU tensors over gloo)."""
    backend = str(dist.get_backend(group)).lower()
    if backend == "nccl":      # NCCL alone; with "cpu:gloo,cuda:nccl" the CPU tensor can stay
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_(t: torch.Tensor, group: Optional[dist.ProcessGroup] = None) -> torch.Tensor:
    """Sum-all-reduce ``t`` in place over ``group`` (default: the world), wherever ``t`` lives.

    A no-op without torch.distributed or with one rank. Returns ``t``.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size(group) == 1:
        return t
    dev = comm_device(group)
    if t.device == dev:
        dist.all_reduce(t, group=group)
        return t
    buf = t.to(dev)
    dist.all_reduce(buf, group=group)
    t.copy_(buf)
    return t
