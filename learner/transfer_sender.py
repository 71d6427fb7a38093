"""The trainer side of a weight update: learner rank 0 sends, every rank gathers.

Built on vLLM's trainer weight-transfer API: on GPU its registered "nccl" trainer engine,
on CPU our "gloo" one below, a thin face of the vLLM-free ``WeightPusher``
(learner/weight_push.py; the worker side is rollout/transfer_gloo.py). Both take a
`VLLMWeightSyncClient` (the control plane to the rollout engines) and a `WeightSource`
(the learner's full tensors, gathered under ZeRO-3), so the learner code is one path.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, ClassVar, Iterable, Iterator

import torch
from vllm.distributed.weight_transfer.base import (ParamMeta, TrainerInitInfo, TrainerWeightTransferEngine,
                                                   VLLMWeightSyncClient, WeightSource)
from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

from learner.weight_push import WeightPusher, tensor_metas

GLOO = "gloo"


class LearnerWeightSource(WeightSource):
    """The learner's weights as vLLM's `WeightSource`: metadata without gathering, and
    a fresh pass of full tensors per round (a collective under ZeRO-3: every learner
    rank iterates in lockstep)."""

    def __init__(self, metadata: Callable[[], list[tuple[str, torch.dtype, tuple[int, ...]]]],
                 tensors: Callable[[], Iterable[tuple[str, torch.Tensor]]], *, resident: bool = False) -> None:
        self._metadata = metadata
        self._tensors = tensors
        # The tensors are views of host memory that stays put while they are sent (the
        # learner's own parameters, not gathered copies): sent from there, in memory order.
        self.resident = resident

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
    shared_memory: bool = True  # engines on this host read the buckets from /dev/shm (learner.sync_shared_memory)


class GlooTrainerWeightTransferEngine(TrainerWeightTransferEngine[GlooTrainerInitInfo]):
    """vLLM's trainer-engine face of ``WeightPusher`` (learner/weight_push.py): rank 0 pushes,
    the other ranks iterate the source to join its ZeRO-3 gathers."""

    init_info_cls = GlooTrainerInitInfo

    def __init__(self, *, client: VLLMWeightSyncClient, source: WeightSource, is_sender: bool,
                 pusher: WeightPusher | None = None) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.pusher = pusher
        self.last_round: dict[str, float] = {}

    @classmethod
    def trainer_init(cls, init_info: GlooTrainerInitInfo, *, client: VLLMWeightSyncClient,
                     source: WeightSource | None = None) -> "GlooTrainerWeightTransferEngine":
        if source is None:
            raise ValueError("gloo weight transfer needs a WeightSource")
        pusher = None
        if init_info.is_sender:
            pusher = WeightPusher.connect(client, master_address=init_info.master_address,
                                          master_port=init_info.master_port, world_size=init_info.world_size,
                                          bucket_bytes=init_info.bucket_bytes, timeout_s=init_info.timeout_s,
                                          shared_memory=init_info.shared_memory)
        return cls(client=client, source=source, is_sender=init_info.is_sender, pusher=pusher)

    def send_weights(self) -> None:
        """One update; the version it brings is the client's ``version`` and whether its buckets
        are hashed and checked the client's ``checksums`` (set by the caller: vLLM's
        no-argument ``send_weights`` has no room for them); the finish carries both."""
        source = self.source
        assert source is not None
        if self.pusher is None:
            for _ in source:  # join the ZeRO-3 gathers of the sender's pass
                pass
            return
        metas = tensor_metas((m.name, m.dtype, m.shape) for m in source.metadata())
        self.last_round = self.pusher.push(metas, source, version=getattr(self.client, "version", None),
                                           checksums=getattr(self.client, "checksums", True),
                                           resident=getattr(source, "resident", False))

    def shutdown(self) -> None:
        if self.pusher is not None:
            self.pusher.close()
        self.pusher = None


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
    # copy=False: the learner's own (unpartitioned) tensors need no copy of their own on the
    # way; on the host they are sent from where they lie (resident).
    resident = backend == GLOO and _unpartitioned_on_host(learner)
    source = LearnerWeightSource(learner.weight_metadata, lambda: learner.full_weights(device=device, copy=False),
                                 resident=resident)
    if backend == GLOO:
        info: TrainerInitInfo = GlooTrainerInitInfo(rank=rank, master_address=master_address,
                                                    master_port=master_port, world_size=world_size,
                                                    bucket_bytes=bucket_bytes, timeout_s=timeout_s,
                                                    shared_memory=learner.config.sync_shared_memory)
    elif backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        info = NCCLTrainerInitInfo(rank=rank, master_address=master_address, master_port=master_port,
                                   world_size=world_size, packed=True, packed_buffer_size_bytes=bucket_bytes)
    elif backend == "ipc":  # colocated on one GPU: CUDA IPC handles, no rendezvous (vLLM's engine)
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        info = IPCTrainerInitInfo(rank=rank, packed=True, packed_buffer_size_bytes=bucket_bytes)
    else:
        raise ValueError(f"rollout.weight_transfer_backend: no trainer engine for {backend!r}")
    return WeightTransferTrainerFactory.trainer_init(info, client=client, source=source)


def _unpartitioned_on_host(learner: Any) -> bool:
    """Whether the learner's parameters are whole tensors in host memory (no ZeRO-3 partitions,
    no GPU): what a weight sync can send from where they lie."""
    from learner.weights import is_partitioned

    module = getattr(getattr(learner, "engine", None), "module", None)
    if module is None:
        return False
    return all(p.device.type == "cpu" and not is_partitioned(p) for p in module.parameters())
