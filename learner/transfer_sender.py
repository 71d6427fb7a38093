"""The trainer side of a weight update: learner rank 0 sends, every rank gathers.

Built on vLLM's trainer weight-transfer API: on GPU its registered "nccl" trainer engine,
on CPU our "gloo" one below (the worker side is rollout/transfer_gloo.py). Both take a
`VLLMWeightSyncClient` (the control plane to the rollout engines) and a `WeightSource`
(the learner's full tensors, gathered under ZeRO-3), so the learner code is one path.
"""

from __future__ import annotations

import inspect
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
from vllm.distributed.weight_transfer.base import (ParamMeta, TrainerInitInfo, TrainerWeightTransferEngine,
                                                   VLLMWeightSyncClient, WeightSource)
from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

from personadual.weight_wire import (BucketBroadcastError, BucketBuffers, TensorMeta, open_transfer_group,
                                     send_buckets)

GLOO = "gloo"
# After a bucket failed, how long (in collective timeouts, plus a margin) to wait for the
# engines' side of the update to say which engine failed it (actors/weight_sync.py waits one
# timeout, then one more for the engines stuck beside a frozen one).
BLAME_TIMEOUTS = 2
BLAME_MARGIN_S = 10.0


class WeightSendError(RuntimeError):
    """A failed weight send; the message names the engine(s) and the bucket when known."""


class LearnerWeightSource(WeightSource):
    """The learner's weights as vLLM's `WeightSource`: metadata without gathering, and
    a fresh pass of full tensors per round (a collective under ZeRO-3: every learner
    rank iterates in lockstep)."""

    def __init__(self, metadata: Callable[[], list[tuple[str, torch.dtype, tuple[int, ...]]]],
                 tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]]) -> None:
        self._metadata = metadata
        self._tensors = tensors

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(name, dtype, tuple(shape)) for name, dtype, shape in self._metadata()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self._tensors())


@dataclass
class GlooTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = GLOO

    master_address: str
    master_port: int
    world_size: int  # 1 sender + every engine worker
    bucket_bytes: int = 64 << 20
    timeout_s: float = 300.0


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client: VLLMWeightSyncClient, source: WeightSource, is_sender: bool,
                 bucket_bytes: int) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_bytes = bucket_bytes
        self.group = None
        self.buffers = BucketBuffers()  # the flat buckets, allocated at the first update only
        self.last_round: dict[str, float] = {}

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client: VLLMWeightSyncClient,
                     source: WeightSource | None = None) -> "GlooTrainerWeightTransferEngine":
        if source is None:
            raise ValueError("gloo weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender,
                     bucket_bytes=init_info.bucket_bytes)
        if not engine.is_sender:
            return engine
        worker_info = {"master_address": init_info.master_address, "master_port": init_info.master_port,
                       "rank_offset": 1, "world_size": init_info.world_size, "timeout_s": init_info.timeout_s}
        # Workers block in the rendezvous inside init_weight_transfer_engine: run it beside
        # opening our end, then surface its error, if any.
        with ThreadPoolExecutor(max_workers=1) as pool:
            future = pool.submit(client.init_weight_transfer_engine, worker_info)
            engine.group = open_transfer_group(init_info.master_address, init_info.master_port, 0,
                                               init_info.world_size, init_info.timeout_s)
            future.result()
        return engine

    def send_weights(self) -> None:
        source = self.source
        assert source is not None
        metas = [TensorMeta(m.name, str(m.dtype).removeprefix("torch."), tuple(m.shape)) for m in source.metadata()]
        if not self.is_sender:
            for _ in source:  # join the ZeRO-3 gathers of the sender's pass
                pass
            return
        start = time.perf_counter()
        update_info = {"names": [m.name for m in metas], "dtype_names": [m.dtype for m in metas],
                       "shapes": [list(m.shape) for m in metas], "bucket_bytes": self.bucket_bytes}
        self.client.start_weight_update()
        started = time.perf_counter()
        pool = ThreadPoolExecutor(max_workers=1)
        checksums: list[int | None] = []
        try:
            future = pool.submit(self.client.update_weights, update_info)

            def surface_worker_failure() -> None:  # the workers failed before a broadcast: don't wait on them
                if future.done():
                    future.result()

            try:
                sent_bytes = send_buckets(self.group, metas, _checked(source, metas), self.bucket_bytes,
                                          before_each=surface_worker_failure, checksums=checksums,
                                          buffers=self.buffers)
            except BucketBroadcastError as error:
                grace = BLAME_TIMEOUTS * getattr(self.client, "timeout_s", 0.0) + BLAME_MARGIN_S
                raise _blame(error, future, grace) from error
            future.result()
            transferred = time.perf_counter()
        finally:
            # Never join a worker RPC stuck in a broken collective: let the error out.
            pool.shutdown(wait=False)
        # The version (set on the client by the caller) and the checksums travel with the finish,
        # to clients that take them (actors/weight_sync.py); vLLM's own client protocol has none.
        finish = self.client.finish_weight_update
        if "checksums" in inspect.signature(finish).parameters:
            finish(checksums=checksums)
        else:
            finish()
        end = time.perf_counter()
        # Where a round goes: the engines' start (vLLM readies its reload), the buckets on the
        # wire and loaded, and the finish (the engines' post-load processing and checks).
        self.last_round = {"seconds": end - start, "bytes": float(sent_bytes), "buckets": float(len(checksums)),
                           "start_s": started - start, "transfer_s": transferred - started,
                           "finish_s": end - transferred}

    def shutdown(self) -> None:
        self.group = None


def _blame(error: BucketBroadcastError, engines_side: Any, grace_s: float) -> Exception:
    """One error naming the bucket that failed and, from the engines' side of the update
    (which names a frozen, dead or failing engine), the engine: the gloo error alone names
    neither."""
    try:
        engines_side.result(timeout=grace_s)
    except Exception as engine_error:  # noqa: BLE001  (its message is the point)
        first = str(engine_error).strip().splitlines()[0] if str(engine_error).strip() else type(engine_error).__name__
        return WeightSendError(f"weight sync: {first.removeprefix('weight sync: ')}; {error}")
    return WeightSendError(f"weight sync: {error}")


def _checked(source: WeightSource, metas: list[TensorMeta]) -> Iterator[torch.Tensor]:
    """The source's tensors, each checked against the metadata the workers were sent."""
    count = 0
    for name, tensor in source:
        if count >= len(metas) or metas[count].name != name or metas[count].shape != tuple(tensor.shape):
            expected = metas[count].name if count < len(metas) else "nothing"
            raise ValueError(f"weight update: source yielded {name!r} where metadata declared {expected!r}")
        count += 1
        yield tensor.detach().to("cpu", metas[count - 1].torch_dtype)  # no copy when already so
    if count != len(metas):
        raise ValueError(f"weight update: source yielded {count} tensors, metadata declared {len(metas)}")


def register() -> None:
    """Make the "gloo" trainer engine known to vLLM's trainer factory (idempotent)."""
    try:
        WeightTransferTrainerFactory.register_engine(GLOO, GlooTrainerWeightTransferEngine)
    except ValueError:  # already registered in this process
        pass


register()


def make_weight_sender(learner: Any, *, rank: int, backend: str, master_address: str, master_port: int,
                       world_size: int, bucket_bytes: int, timeout_s: float,
                       client: VLLMWeightSyncClient) -> TrainerWeightTransferEngine:
    """The trainer engine for ``backend`` over this rank's learner: rank 0 sends, the
    others join the gathers. "gloo" on CPU, vLLM's "nccl" on GPU; same handshake."""
    device = "cpu" if backend == GLOO else None  # gloo sends host memory; NCCL sends from the GPU
    # copy=False: every tensor is packed into its bucket before the next one is read, so
    # the learner's own (unpartitioned) tensors need no copy of their own on the way.
    source = LearnerWeightSource(learner.weight_metadata, lambda: learner.full_weights(device=device, copy=False))
    if backend == GLOO:
        info: TrainerInitInfo = GlooTrainerInitInfo(rank=rank, master_address=master_address,
                                                    master_port=master_port, world_size=world_size,
                                                    bucket_bytes=bucket_bytes, timeout_s=timeout_s)
    elif backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        info = NCCLTrainerInitInfo(rank=rank, master_address=master_address, master_port=master_port,
                                   world_size=world_size, packed=True, packed_buffer_size_bytes=bucket_bytes)
    else:
        raise ValueError(f"rollout.weight_transfer_backend: no trainer engine for {backend!r}")
    return WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)
