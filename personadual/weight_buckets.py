"""Bucket plans and the host memory buckets live in, kept from one weight update to the next.

Sender and receivers derive the same plan from the same metadata (names, dtypes, shapes and
the bucket size), so no per-bucket header travels (personadual/weight_wire.py sends them).
Each side keeps its bucket buffers (``BucketBuffers``): allocating and first touching ~100 MB
of fresh pages per update cost more than the broadcast itself on a 2-core CPU. Engines on the
sender's host share the sender's buffers instead (``SharedBuckets``: one file under /dev/shm
both ends map), so the bytes are written once and read where they lie.
"""

from __future__ import annotations

import errno
import math
import os
import uuid
import weakref
from dataclasses import dataclass
from pathlib import Path
from typing import Collection, Sequence

import torch


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


def plan_buckets(metas: Sequence[TensorMeta], bucket_bytes: int, breaks: Collection[int] = ()) -> list[list[int]]:
    """Consecutive runs of tensor indices whose bytes fit ``bucket_bytes``; a tensor larger
    than a bucket travels alone; a bucket also ends before every index in ``breaks``.

    A full bucket ends where a layer of the model starts (``layer_of``), not inside one, when
    it holds a whole layer before that point: an engine packs a layer once all of its tensors
    arrived, so a layer split over two buckets waits for the second (and is staged in between,
    rollout/cpu_reload.py), while whole layers are loaded as soon as their bucket is in."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes: must be > 0, got {bucket_bytes}")
    breaks = set(breaks)
    buckets: list[list[int]] = []
    current: list[int] = []
    size = 0
    for index, meta in enumerate(metas):
        if current and (size + meta.nbytes > bucket_bytes or index in breaks):
            splits_a_layer = index not in breaks and layer_of(meta.name) == layer_of(metas[current[-1]].name)
            cut = (_last_layer_start(metas, current) if splits_a_layer else 0) or len(current)
            buckets.append(current[:cut])
            current = current[cut:]  # the started layer's tensors, carried to the next bucket
            size = bucket_nbytes(metas, current)
            if current and size + meta.nbytes > bucket_bytes:  # the layer alone outgrows a bucket
                buckets.append(current)
                current, size = [], 0
        current.append(index)
        size += meta.nbytes
    if current:
        buckets.append(current)
    return buckets


def layer_of(name: str) -> str:
    """The layer a tensor belongs to: its name up to the first numeric part
    ("model.layers.3.mlp.up_proj.weight" -> "model.layers.3"); else the name itself."""
    parts = name.split(".")
    for position, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[:position + 1])
    return name


def _last_layer_start(metas: Sequence[TensorMeta], bucket: Sequence[int]) -> int:
    """Position in ``bucket`` where its last layer's tensors begin; 0 if it holds one layer."""
    last = layer_of(metas[bucket[-1]].name)
    position = len(bucket)
    while position > 0 and layer_of(metas[bucket[position - 1]].name) == last:
        position -= 1
    return position


def bucket_nbytes(metas: Sequence[TensorMeta], bucket: Sequence[int]) -> int:
    return sum(metas[i].nbytes for i in bucket)


class BucketBuffers:
    """One flat uint8 host buffer per bucket of a plan (disjoint slices of one allocation),
    allocated at the first update and reused while the plan (metadata and bucket size) stays
    the same. A receiver's loader may hold views of a bucket until the update finishes: every
    bucket has its own buffer, and the next update is the first to overwrite it."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._plan: list[list[int]] = []
        self._buffers: list[torch.Tensor] = []

    def plan(self, metas: Sequence[TensorMeta], bucket_bytes: int,
             breaks: Collection[int] = ()) -> list[tuple[list[int], torch.Tensor]]:
        key = (tuple(metas), bucket_bytes, tuple(sorted(breaks)))
        if key != self._key:
            plan = plan_buckets(metas, bucket_bytes, breaks)
            sizes = [bucket_nbytes(metas, bucket) for bucket in plan]
            memory = self._allocate(sum(sizes))
            self._plan, self._buffers, offset = plan, [], 0
            for size in sizes:
                self._buffers.append(memory[offset:offset + size])
                offset += size
            self._key = key
        return list(zip(self._plan, self._buffers))

    def _allocate(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)


SHARED_DIRECTORY = Path("/dev/shm")
SHARED_PREFIX = "personadual-weights-"


class SharedBuckets(BucketBuffers):
    """Bucket buffers in one file under ``directory`` (tmpfs: memory, not disk) that the
    sender creates and the engines on its host map. The file's space is reserved when it is
    made (``posix_fallocate``), so a full /dev/shm is an error there, never a SIGBUS on a
    later write; the sender removes its file when the plan changes, at ``close`` and at exit
    (files of senders no longer alive are removed when a new one is made)."""

    def __init__(self, directory: Path = SHARED_DIRECTORY) -> None:
        super().__init__()
        self.directory = directory
        self.path: Path | None = None
        self._attach_to: Path | None = None
        self._remove: weakref.finalize | None = None

    def plan_shared(self, metas: Sequence[TensorMeta], bucket_bytes: int,
                    breaks: Collection[int] = ()) -> list[tuple[list[int], torch.Tensor]] | None:
        """The sender's plan in a file it owns; None when the file cannot be made (no
        /dev/shm, or not room for the buckets): the update then goes over the wire."""
        try:
            return self.plan(metas, bucket_bytes, breaks)
        except (OSError, RuntimeError):  # torch.from_file raises RuntimeError where mmap fails
            self._key = None
            self.close()
            return None

    def attach(self, path: str, metas: Sequence[TensorMeta], bucket_bytes: int,
               breaks: Collection[int] = ()) -> list[tuple[list[int], torch.Tensor]] | None:
        """A receiver's view of the sender's file at ``path``; None when this process cannot
        map it (another host, or the file too small for the plan)."""
        if Path(path) != self.path:
            self._key = None
        self._attach_to = Path(path)
        try:
            return self.plan(metas, bucket_bytes, breaks)
        except (OSError, RuntimeError):  # torch.from_file raises RuntimeError for a missing file
            self._key, self.path = None, None
            return None

    def _allocate(self, nbytes: int) -> torch.Tensor:
        if self._attach_to is not None:
            if not self._attach_to.is_file() or self._attach_to.stat().st_size < nbytes:
                raise OSError(errno.ENOENT, "no shared bucket file of that size", str(self._attach_to))
            self.path = self._attach_to
            return torch.from_file(str(self.path), shared=True, size=nbytes, dtype=torch.uint8)
        self.close()
        _remove_orphans(self.directory)
        path = self.directory / f"{SHARED_PREFIX}{os.getpid()}-{uuid.uuid4().hex[:12]}"
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self._remove = weakref.finalize(self, _unlink, path)
        try:
            if nbytes:
                os.posix_fallocate(descriptor, 0, nbytes)
        except OSError:
            self.close()
            raise
        finally:
            os.close(descriptor)
        self.path = path
        return torch.from_file(str(path), shared=True, size=nbytes, dtype=torch.uint8)

    def close(self) -> None:
        """Remove the sender's file (mappings already made stay valid until dropped)."""
        if self._remove is not None:
            self._remove()
            self._remove = None


def _unlink(path: Path) -> None:
    try:
        path.unlink()
    except FileNotFoundError:
        pass


def _remove_orphans(directory: Path) -> None:
    """Bucket files of senders that died without removing theirs (a killed learner)."""
    for path in directory.glob(f"{SHARED_PREFIX}*"):
        try:
            pid = int(path.name.removeprefix(SHARED_PREFIX).split("-")[0])
            os.kill(pid, 0)
        except ProcessLookupError:
            _unlink(path)
        except (ValueError, PermissionError):
            continue
