"""The wire of a weight update: its own process group, and tensors packed into buckets.

Sender and receivers derive the same bucket plan from the same metadata (names, dtypes,
shapes and the bucket size), so one broadcast per bucket carries many parameters and no
per-bucket header travels. Per-parameter broadcasts are a known bottleneck of older
trainers (docs/ARCHITECTURE.md, "Loss and weight-sync rules").
"""

from __future__ import annotations

import datetime
import math
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class TensorMeta:
    name: str
    dtype: str  # torch dtype name without the "torch." prefix, e.g. "float32"
    shape: tuple[int, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        dtype = getattr(torch, self.dtype, None)
        if not isinstance(dtype, torch.dtype):
            raise ValueError(f"weight update: {self.name}: unknown dtype {self.dtype!r}")
        return dtype

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * torch.empty((), dtype=self.torch_dtype).element_size()

    @classmethod
    def of(cls, name: str, tensor: torch.Tensor) -> "TensorMeta":
        return cls(name, str(tensor.dtype).removeprefix("torch."), tuple(tensor.shape))


def plan_buckets(metas: Sequence[TensorMeta], bucket_bytes: int) -> list[list[int]]:
    """Consecutive runs of tensor indices whose bytes fit ``bucket_bytes``; a tensor larger
    than a bucket travels alone."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes: must be > 0, got {bucket_bytes}")
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for index, meta in enumerate(metas):
        if current and size + meta.nbytes > bucket_bytes:
            buckets.append(current)
            current, size = [], 0
        current.append(index)
        size += meta.nbytes
    if current:
        buckets.append(current)
    return buckets


def pack(tensors: Iterable[torch.Tensor]) -> torch.Tensor:
    """One flat uint8 buffer holding the tensors' bytes back to back."""
    parts = [t.detach().contiguous().reshape(-1).view(torch.uint8) for t in tensors]
    return torch.cat(parts) if parts else torch.empty(0, dtype=torch.uint8)


def unpack(buffer: torch.Tensor, metas: Sequence[TensorMeta]) -> Iterator[tuple[str, torch.Tensor]]:
    offset = 0
    for meta in metas:
        chunk = buffer[offset:offset + meta.nbytes]
        if chunk.numel() != meta.nbytes:
            raise ValueError(f"weight update: bucket too short for {meta.name}")
        yield meta.name, chunk.view(meta.torch_dtype).reshape(meta.shape)
        offset += meta.nbytes
    if offset != buffer.numel():
        raise ValueError(f"weight update: bucket has {buffer.numel() - offset} unexpected trailing bytes")


def bucket_nbytes(metas: Sequence[TensorMeta], bucket: Sequence[int]) -> int:
    return sum(metas[i].nbytes for i in bucket)


def open_transfer_group(host: str, port: int, rank: int, world_size: int,
                        timeout_s: float) -> dist.ProcessGroupGloo:
    """A gloo group of its own, never the default group (the learner's ranks use that):
    rank 0, the sender, hosts the rendezvous store; every collective times out."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout,
                          wait_for_workers=False)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


def send_buckets(group: dist.ProcessGroup, metas: Sequence[TensorMeta], tensors: Iterator[torch.Tensor],
                 bucket_bytes: int, *, before_each: Callable[[], None] | None = None) -> int:
    """Broadcast ``tensors`` (in ``metas`` order) from rank 0, one collective per bucket;
    ``before_each`` runs before every broadcast (a chance to surface a receiver's failure
    instead of blocking on it). Returns the bytes sent."""
    sent = 0
    for bucket in plan_buckets(metas, bucket_bytes):
        buffer = pack(next(tensors) for _ in bucket)
        if before_each is not None:
            before_each()
        group.broadcast(buffer, 0).wait()
        sent += buffer.numel()
    return sent


def receive_buckets(group: dist.ProcessGroup, metas: Sequence[TensorMeta],
                    bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The receiving side of ``send_buckets``: each bucket's (name, tensor) pairs, as views
    of a fresh host buffer."""
    for bucket in plan_buckets(metas, bucket_bytes):
        bucket_metas = [metas[i] for i in bucket]
        buffer = torch.empty(bucket_nbytes(metas, bucket), dtype=torch.uint8)
        group.broadcast(buffer, 0).wait()
        yield list(unpack(buffer, bucket_metas))
