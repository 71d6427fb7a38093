"""torch.distributed for the learner ranks: rendezvous, DeepSpeed's comm layer, reductions."""

from __future__ import annotations

import datetime
import os
import socket

import deepspeed
import deepspeed.ops
import torch
import torch.distributed as dist

LOOPBACK = "127.0.0.1"


def free_port(host: str = LOOPBACK) -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def backend_for(device: str) -> str:
    return "nccl" if device.startswith("cuda") else "gloo"


def init_process_group(*, rank: int, world_size: int, master_address: str, master_port: int,
                       backend: str, timeout_s: float) -> None:
    """Join the learner group (every collective times out after ``timeout_s``, so a lost
    peer fails loudly instead of hanging)."""
    if dist.is_initialized():
        if dist.get_world_size() != world_size or dist.get_rank() != rank:
            raise RuntimeError(f"torch.distributed is already initialised as rank {dist.get_rank()} of "
                               f"{dist.get_world_size()}, not rank {rank} of {world_size}")
        return
    # DeepSpeed reads these even when handed an initialised group.
    os.environ.update({"MASTER_ADDR": master_address, "MASTER_PORT": str(master_port), "RANK": str(rank),
                       "WORLD_SIZE": str(world_size), "LOCAL_RANK": "0"})
    dist.init_process_group(backend=backend, init_method=f"tcp://{master_address}:{master_port}", rank=rank,
                            world_size=world_size, timeout=datetime.timedelta(seconds=timeout_s))
    # A new default group makes any group DeepSpeed cached from an earlier one (torn down by
    # someone else, e.g. an in-process vLLM engine) dead; its next broadcast would fail on it.
    from deepspeed.utils import groups

    groups._release_process_group_references(group=None)


def init_deepspeed_comm(backend: str, timeout_s: float) -> None:
    """DeepSpeed's comm layer over the existing group, without its shared-memory CPU op:
    that op only serves inference all-reduce and costs a ~97 s JIT build on first use
    (docs/ARCHITECTURE.md, "The real stack on CPU"). Marking it incompatible is the switch DeepSpeed reads."""
    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    # DeepSpeed asserts these even over a group someone else created (e.g. an in-process
    # vLLM engine's). Each rank drives one device, so its local rank is 0.
    os.environ.setdefault("RANK", str(dist.get_rank()))
    os.environ.setdefault("WORLD_SIZE", str(dist.get_world_size()))
    os.environ.setdefault("LOCAL_RANK", "0")
    deepspeed.init_distributed(dist_backend=backend, timeout=datetime.timedelta(seconds=timeout_s))


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else 1


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp.RedOpType = dist.ReduceOp.SUM) -> torch.Tensor:
    """In-place all-reduce; a no-op on one rank."""
    if world_size() > 1:
        dist.all_reduce(tensor, op=op)
    return tensor


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()
