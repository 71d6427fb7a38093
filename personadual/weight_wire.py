"""The wire of a weight update: its own process group, and tensors packed into buckets.

Sender and receivers derive the same bucket plan from the same metadata (names, dtypes,
shapes and the bucket size), so one broadcast per bucket carries many parameters and no
per-bucket header travels. Per-parameter broadcasts are a known bottleneck of older
trainers (docs/ARCHITECTURE.md, "Loss and weight-sync rules").

Each side keeps its flat bucket buffers from one update to the next (``BucketBuffers``,
personadual/weight_buckets.py): the sender copies every tensor once, straight into its
slice, and the receiver hands on views of the buffer it received into. A bucket whose tensors
already lie back to back in the sender's memory (a DeepSpeed ZeRO-1/2 rank keeps its
parameters as views of one flat buffer per parameter group) is broadcast from that memory
with no copy at all; ``memory_order`` puts the tensors in that order and says where the
buckets must break so that as many as possible do.

Engines on the sender's host can skip the wire (``SharedBuckets``): the buckets live in one
file under /dev/shm that both ends map, the sender writes each bucket there once and the
engines load it from where it was written, so no socket copies the bytes at either end. The
process group then only carries the per-bucket acknowledgements. Every member must map the
file for an update to go this way; otherwise it goes over gloo as above.
"""

from __future__ import annotations

import datetime
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Collection, Iterable, Iterator, Sequence

import torch
import torch.distributed as dist
import xxhash

from personadual.fault_hooks import fault_point, fault_text
from personadual.weight_buckets import BucketBuffers, SharedBuckets, TensorMeta, plan_buckets


def memory_order(tensors: Sequence[torch.Tensor]) -> tuple[list[int], list[int]]:
    """An order of ``tensors`` in which those sharing a storage follow one another as they lie
    in it (one that overlaps memory an earlier one covers, e.g. a tied lm_head, goes last),
    and the positions in that order where a tensor does not start where the previous one
    ended (``plan_buckets``' breaks)."""
    def storage(t: torch.Tensor) -> int:
        return t.untyped_storage().data_ptr()

    order, overlapping, ends = [], [], {}
    for index in sorted(range(len(tensors)), key=lambda i: (storage(tensors[i]), tensors[i].data_ptr(), i)):
        tensor = tensors[index]
        if tensor.data_ptr() < ends.get(storage(tensor), -1):
            overlapping.append(index)
            continue
        ends[storage(tensor)] = tensor.data_ptr() + tensor.numel() * tensor.element_size()
        order.append(index)
    order += overlapping
    breaks = [position for position in range(1, len(order))
              if span_bytes([tensors[order[position - 1]], tensors[order[position]]]) is None]
    return order, breaks


def span_bytes(tensors: Sequence[torch.Tensor]) -> torch.Tensor | None:
    """The bytes of ``tensors`` as one flat uint8 view of the memory they share, when they lie
    back to back in it (host memory, each contiguous); else None. The sender broadcasts such a
    bucket from there; an engine packs a fused layer from the received tensors so
    (rollout/cpu_reload.py)."""
    first = tensors[0]
    end = first.data_ptr()
    for tensor in tensors:
        if (tensor.device.type != "cpu" or not tensor.is_contiguous() or tensor.data_ptr() != end
                or tensor.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()):
            return None
        end += tensor.numel() * tensor.element_size()
    offset = first.data_ptr() - first.untyped_storage().data_ptr()
    return torch.empty(0, dtype=torch.uint8).set_(first.untyped_storage(), offset, (end - first.data_ptr(),))


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


def agree(group: dist.ProcessGroup, able: bool) -> bool:
    """Whether every member of ``group`` is ``able`` (a MIN all-reduce of one flag)."""
    flag = torch.tensor([int(able)], dtype=torch.int32)
    options = dist.AllreduceOptions()
    options.reduceOp = dist.ReduceOp.MIN
    group.allreduce([flag], options).wait()
    return bool(flag.item())


def pack_into(buffer: torch.Tensor, tensors: Iterable[torch.Tensor]) -> None:
    """``tensors``' bytes back to back in ``buffer``: one copy each, no staging buffer."""
    offset = 0
    for tensor in tensors:
        source = tensor.detach().contiguous().reshape(-1).view(torch.uint8)
        buffer[offset:offset + source.numel()].copy_(source)
        offset += source.numel()
    if offset != buffer.numel():
        raise ValueError(f"weight update: packed {offset} bytes into a bucket of {buffer.numel()}")


def open_transfer_group(host: str, port: int, rank: int, world_size: int,
                        timeout_s: float) -> dist.ProcessGroupGloo:
    """A gloo group of its own, never the default group (the learner's ranks use that):
    rank 0, the sender, hosts the rendezvous store; every collective times out."""
    timeout = datetime.timedelta(seconds=timeout_s)
    store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=timeout,
                          wait_for_workers=False)
    return dist.ProcessGroupGloo(store, rank, world_size, timeout)


class BucketBroadcastError(RuntimeError):
    """A bucket's broadcast failed (a peer died, froze past the timeout, or left the group);
    the message names the bucket and its first tensor."""

    def __init__(self, index: int, total: int, names: Sequence[str], cause: BaseException) -> None:
        self.index, self.total, self.names = index, total, list(names)
        first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
        super().__init__(f"bucket {index + 1} of {total} ({names[0]}{' ...' if len(names) > 1 else ''}) "
                         f"did not go through: {first}")


def bucket_checksum(buffer: torch.Tensor) -> int | None:
    """XXH3-64 of a host bucket's bytes; None for device memory (copying a GPU bucket back to
    the host to check it would cost more than the transfer: the probe check covers those).
    XXH3 rather than CRC-32: over 105 MB zlib's CRC-32 took 28 ms here (75-120 ms on busy
    cores), longer than the broadcast itself, at each end; XXH3 takes 11 ms and catches a
    flipped bit just the same."""
    if buffer.device.type != "cpu":
        return None
    return xxhash.xxh3_64_intdigest(buffer.numpy().data) if buffer.numel() else 0


def _acknowledge(group: dist.ProcessGroup) -> None:
    """Every member confirms it holds the bucket: a one-element all-reduce. Without it a
    broadcast into a frozen peer's socket buffers "succeeds", and the sender only learns of
    the freeze at the end of the update, not at the bucket it happened in."""
    group.allreduce([torch.ones(1, dtype=torch.int32)]).wait()


def _corrupt_asked(buffer: torch.Tensor) -> bool:
    """FAULT INJECTION (tests only): flip one byte of a bucket after its checksum was taken."""
    return bool(buffer.numel()) and fault_text("corrupt_bucket") is not None


def send_buckets(group: dist.ProcessGroup, metas: Sequence[TensorMeta], tensors: Iterator[torch.Tensor],
                 bucket_bytes: int, *, before_each: Callable[[], None] | None = None,
                 checksums: list[int | None] | None = None, buffers: BucketBuffers | None = None,
                 breaks: Collection[int] = (), direct: list[int] | None = None,
                 shared: SharedBuckets | None = None) -> tuple[int, bool]:
    """Broadcast ``tensors`` (in ``metas`` order) from rank 0, one collective per bucket
    (``plan_buckets`` with ``breaks``); ``before_each`` runs before every broadcast (a chance
    to surface a receiver's failure instead of blocking on it); each bucket's
    ``bucket_checksum`` is appended to ``checksums``. ``buffers``, kept by the caller, saves
    allocating the buckets again at every update. A bucket whose tensors lie back to back in
    memory goes from there, uncopied (the caller leaves them untouched until this returns);
    the bytes each bucket sent so are appended to ``direct``. Returns the bytes sent and
    whether they went through ``shared``; a failed broadcast raises ``BucketBroadcastError``.

    Pipelined: bucket k+1 is packed (and its checksum taken, in a thread) while bucket k is
    on the wire; every bucket has its own buffer, so nothing in flight is overwritten.

    ``shared``: the buckets' file, offered to the receivers (its path went with the update);
    when every receiver mapped it, each bucket is written there and only acknowledged on the
    group, so the receivers load bucket k while bucket k+1 is being written."""
    try:
        via_memory = shared is not None and agree(group, True)
    except RuntimeError as error:  # a receiver froze or died before the first bucket
        plan = plan_buckets(metas, bucket_bytes, breaks)
        raise BucketBroadcastError(0, len(plan), [metas[i].name for i in plan[0]], error) from error
    plan = (shared if via_memory else buffers or BucketBuffers()).plan(metas, bucket_bytes, breaks)
    pending: list[Future] = []
    in_flight: tuple[int, dist.Work | None] | None = None

    def complete(index: int, work: dist.Work | None) -> None:
        try:
            if work is not None:
                work.wait()
            _acknowledge(group)
        except RuntimeError as error:  # gloo: a timeout, or a peer's connection closed
            raise BucketBroadcastError(index, len(plan), [metas[i].name for i in plan[index][0]], error) from error

    with ThreadPoolExecutor(max_workers=1) as hasher:
        for index, (bucket, buffer) in enumerate(plan):
            parts = [next(tensors) for _ in bucket]
            corrupt = _corrupt_asked(buffer)
            span = None if corrupt else span_bytes(parts)
            if span is not None and span.numel() == buffer.numel():
                if via_memory:
                    buffer.copy_(span)
                else:
                    buffer = span
            else:
                pack_into(buffer, parts)
            if direct is not None:
                direct.append(buffer.numel() if buffer is span else 0)
            if checksums is not None:
                pending.append(hasher.submit(bucket_checksum, buffer))
            if corrupt:
                if checksums is not None:
                    pending[-1].result()  # the checksum is of the bytes as packed
                buffer[buffer.numel() // 2] ^= 0xFF
            if in_flight is not None:
                complete(*in_flight)
            if before_each is not None:
                before_each()
            in_flight = (index, None if via_memory else group.broadcast(buffer, 0))
            if via_memory:  # the receivers may read it now: nothing to overlap on our side
                complete(*in_flight)
                in_flight = None
        if in_flight is not None:
            complete(*in_flight)
        if checksums is not None:
            checksums.extend(future.result() for future in pending)
    return sum(buffer.numel() for _, buffer in plan), via_memory


@dataclass
class ReceivedUpdate:
    """What a receiver got in its last update: each bucket's checksum and the tensors it
    handed on to be loaded (compared with the sender's at the end of the update)."""

    checksums: list[int | None] = field(default_factory=list)
    loaded: list[str] = field(default_factory=list)
    buckets: list[list[str]] = field(default_factory=list)

    def mismatch(self, sent: Sequence[int | None]) -> str | None:
        """None when every bucket arrived as sent; else which bucket differs."""
        if len(sent) != len(self.checksums):
            return f"{len(self.checksums)} buckets received, {len(sent)} sent"
        for index, (mine, theirs) in enumerate(zip(self.checksums, sent)):
            if mine is not None and theirs is not None and mine != theirs:
                names = self.buckets[index]
                return (f"bucket {index + 1} of {len(sent)} ({names[0]}{' ...' if len(names) > 1 else ''}) "
                        f"arrived with checksum {mine:#010x}, sent with {theirs:#010x}")
        return None


def receive_buckets(group: dist.ProcessGroup, metas: Sequence[TensorMeta], bucket_bytes: int,
                    record: ReceivedUpdate | None = None, buffers: BucketBuffers | None = None, *,
                    checksums: bool = True, breaks: Collection[int] = (), shared_path: str | None = None,
                    shared: SharedBuckets | None = None) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """The receiving side of ``send_buckets``: each bucket's (name, tensor) pairs, as views
    of the buffer it was received into (``buffers``, kept by the caller, reuses them from
    one update to the next; the views are valid until the next update); ``record`` (reset
    here, complete once the iteration ends) notes each bucket's checksum (``checksums``: when
    the sender takes them too) and the tensors handed on.

    Pipelined: bucket k+1 is already on its way in (and bucket k's checksum being taken, in a
    thread) while the caller loads bucket k.

    ``shared_path``: the sender's bucket file, when it offered one; mapped through ``shared``
    (kept by the caller), and used when every receiver could map it: the tensors are then
    views of where the sender wrote them."""
    if record is not None:
        record.checksums.clear(), record.loaded.clear(), record.buckets.clear()
    skip = fault_text("skip_tensor")  # FAULT INJECTION (tests only): a tensor silently not loaded
    via_memory = False
    if shared_path is not None:
        mapped = shared is not None and shared.attach(shared_path, metas, bucket_bytes, breaks) is not None
        via_memory = agree(group, mapped)
    plan = (shared if via_memory else buffers or BucketBuffers()).plan(metas, bucket_bytes, breaks)
    pending: list[Future] = []

    def post(number: int) -> dist.Work | None:
        fault_point("bucket", str(number))  # tests freeze or kill a receiver before bucket N
        return None if via_memory else group.broadcast(plan[number - 1][1], 0)

    with ThreadPoolExecutor(max_workers=1) as hasher:
        incoming = post(1) if plan else None
        for number, (bucket, buffer) in enumerate(plan, start=1):
            if incoming is not None:
                incoming.wait()
            _acknowledge(group)
            if number < len(plan):
                incoming = post(number + 1)
            bucket_metas = [metas[i] for i in bucket]
            named = [(name, tensor) for name, tensor in unpack(buffer, bucket_metas) if name != skip]
            if record is not None:
                if checksums:
                    pending.append(hasher.submit(bucket_checksum, buffer))
                record.buckets.append([m.name for m in bucket_metas])
                record.loaded.extend(name for name, _ in named)
            yield named
        if record is not None:
            record.checksums.extend(future.result() for future in pending)
