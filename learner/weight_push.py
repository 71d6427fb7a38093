"""Rank 0's side of a weight update, without vLLM: the one sequence every sender runs.

An update is four calls on the engines' control plane (``EngineUpdateClient``) around the
buckets on the wire: start, update (the engines receive, concurrently with our broadcasts),
the buckets themselves (personadual/weight_wire.py: each acknowledged, hashed when asked), and
finish, which carries the version the update brings and the sender's checksums, so the
engines go live at that version after checking what arrived, with no second round.

learner/transfer_sender.py wraps this in vLLM's ``TrainerWeightTransferEngine`` for the
driver; scripts/gpu_smoke.py uses it as is (its image has a CUDA torch but no vLLM).
"""

from __future__ import annotations

import inspect
import time
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Iterable, Iterator, Protocol, Sequence

import torch
import torch.distributed as dist

from personadual.weight_buckets import BucketBuffers, SharedBuckets, TensorMeta
from personadual.weight_wire import BucketBroadcastError, memory_order, open_transfer_group, send_buckets

# After a bucket failed, how long (in collective timeouts, plus a margin) to wait for the
# engines' side of the update to say which engine failed it (actors/weight_sync.py waits one
# timeout, then one more for the engines stuck beside a frozen one).
BLAME_TIMEOUTS = 2
BLAME_MARGIN_S = 10.0


class WeightSendError(RuntimeError):
    """A failed weight send; the message names the engine(s) and the bucket when known."""


class EngineUpdateClient(Protocol):
    """The engines' weight-update control plane, as vLLM's ``VLLMWeightSyncClient`` has it;
    ``finish_weight_update`` may also take ``checksums`` (each bucket's, as sent), which the
    engines compare with what they received. Every call returns once every engine is done."""

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None: ...

    def start_weight_update(self) -> None: ...

    def update_weights(self, update_info: dict[str, Any]) -> None: ...

    def finish_weight_update(self, weight_version: Any = None) -> None: ...


def tensor_metas(metadata: Iterable[tuple[str, torch.dtype, Sequence[int]]]) -> list[TensorMeta]:
    """(name, torch dtype, full shape) triples, e.g. ``Learner.weight_metadata()``, as wire metadata."""
    return [TensorMeta(name, str(dtype).removeprefix("torch."), tuple(shape)) for name, dtype, shape in metadata]


class WeightPusher:
    """Sends full updates from rank 0 of a transfer group of its own to every engine worker
    (ranks 1..world_size-1); keeps its bucket buffers from one update to the next."""

    def __init__(self, client: EngineUpdateClient, group: dist.ProcessGroup, *, bucket_bytes: int,
                 timeout_s: float, shared_memory: bool = True) -> None:
        self.client, self.group = client, group
        self.bucket_bytes, self.timeout_s = bucket_bytes, timeout_s
        self.buffers = BucketBuffers()  # the flat buckets, allocated at the first update only
        # The buckets in /dev/shm for engines on this host (personadual/weight_buckets.py)
        self.shared = SharedBuckets() if shared_memory else None

    @classmethod
    def connect(cls, client: EngineUpdateClient, *, master_address: str, master_port: int, world_size: int,
                bucket_bytes: int, timeout_s: float, shared_memory: bool = True) -> "WeightPusher":
        """Open the group with every engine worker: they join at ranks from 1 on."""
        worker_info = {"master_address": master_address, "master_port": master_port, "rank_offset": 1,
                       "world_size": world_size, "timeout_s": timeout_s}
        # The workers block in the rendezvous inside init_weight_transfer_engine: run it beside
        # opening our end, then surface its error, if any.
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(client.init_weight_transfer_engine, worker_info)
            group = open_transfer_group(master_address, master_port, 0, world_size, timeout_s)
            future.result()
        return cls(client, group, bucket_bytes=bucket_bytes, timeout_s=timeout_s, shared_memory=shared_memory)

    def push(self, metas: Sequence[TensorMeta], named: Iterable[tuple[str, torch.Tensor]],
             version: int | None = None, *, checksums: bool = True, resident: bool = False) -> dict[str, float]:
        """One full update: ``named`` yields every tensor of ``metas`` in order (checked as it
        goes); the engines take it live at ``version``, after comparing each bucket with the
        hash the sender took (``checksums``; ~11 ms per 100 MB at each end, so a run takes
        them on the syncs it verifies, actors/weight_sync.py). ``resident``: the tensors are
        views of memory that stays put during the update (a ZeRO-1/2 rank's parameters): they
        travel in memory order, each bucket straight from that memory where its tensors lie
        back to back. Returns where the time went: the engines' start (vLLM readies its
        reload), the buckets on the wire and loaded, and the finish (the engines' post-load
        processing and checks), and the bytes sent without a copy."""
        start = time.perf_counter()
        tensors: Iterator[torch.Tensor] = _checked(named, metas)
        breaks: list[int] = []
        if resident:
            held = list(tensors)
            order, breaks = memory_order(held)
            metas, tensors = [metas[i] for i in order], iter([held[i] for i in order])
        offered = self.shared is not None and self.shared.plan_shared(metas, self.bucket_bytes, breaks) is not None
        update_info = {"names": [m.name for m in metas], "dtype_names": [m.dtype for m in metas],
                       "shapes": [list(m.shape) for m in metas], "bucket_bytes": self.bucket_bytes,
                       "checksums": checksums, "breaks": breaks,
                       "shared_path": str(self.shared.path) if offered else None}
        self.client.start_weight_update()
        started = time.perf_counter()
        pool = ThreadPoolExecutor(max_workers=1)
        sent: list[int | None] | None = [] if checksums else None
        direct: list[int] = []
        try:
            engines_side = pool.submit(self.client.update_weights, update_info)

            def surface_engine_failure() -> None:  # the engines failed before a broadcast: don't wait on them
                if engines_side.done():
                    engines_side.result()

            try:
                sent_bytes, via_memory = send_buckets(
                    self.group, metas, tensors, self.bucket_bytes, before_each=surface_engine_failure,
                    checksums=sent, buffers=self.buffers, breaks=breaks, direct=direct,
                    shared=self.shared if offered else None)
            except BucketBroadcastError as error:
                raise _blame(error, engines_side, BLAME_TIMEOUTS * self.timeout_s + BLAME_MARGIN_S) from error
            engines_side.result()
            transferred = time.perf_counter()
        finally:
            # Never join an engine call stuck in a broken collective: let the error out.
            pool.shutdown(wait=False)
        self._finish(version, sent)
        end = time.perf_counter()
        return {"seconds": end - start, "bytes": float(sent_bytes), "buckets": float(len(direct)),
                "direct_bytes": float(sum(direct)), "shared_memory": float(via_memory),
                "start_s": started - start, "transfer_s": transferred - started, "finish_s": end - transferred}

    def close(self) -> None:
        """Remove the shared bucket file, if one was made."""
        if self.shared is not None:
            self.shared.close()

    def _finish(self, version: int | None, checksums: list[int | None] | None) -> None:
        finish = self.client.finish_weight_update
        # vLLM's own clients take no checksums: those engines go without the check.
        if checksums is not None and "checksums" in inspect.signature(finish).parameters:
            finish(version, checksums=checksums)
        else:
            finish(version)


def _blame(error: BucketBroadcastError, engines_side: Future, grace_s: float) -> Exception:
    """One error naming the bucket that failed and, from the engines' side of the update
    (which names a frozen, dead or failing engine), the engine: the gloo error alone names
    neither."""
    try:
        engines_side.result(timeout=grace_s)
    except Exception as engine_error:  # noqa: BLE001  (its message is the point)
        first = str(engine_error).strip().splitlines()[0] if str(engine_error).strip() else type(engine_error).__name__
        return WeightSendError(f"weight sync: {first.removeprefix('weight sync: ')}; {error}")
    return WeightSendError(f"weight sync: {error}")


def _checked(named: Iterable[tuple[str, torch.Tensor]], metas: Sequence[TensorMeta]) -> Iterator[torch.Tensor]:
    """The tensors, each checked against the metadata the engines were sent, on the host in
    the declared dtype (no copy when already so)."""
    count = 0
    for name, tensor in named:
        if count >= len(metas) or metas[count].name != name or metas[count].shape != tuple(tensor.shape):
            expected = metas[count].name if count < len(metas) else "nothing"
            raise ValueError(f"weight update: source yielded {name!r} where metadata declared {expected!r}")
        count += 1
        yield tensor.detach().to("cpu", metas[count - 1].torch_dtype)
    if count != len(metas):
        raise ValueError(f"weight update: source yielded {count} tensors, metadata declared {len(metas)}")
